"""tasks/fixes.py: each rule with the message text TensorRT 8.6 / 10 print (from user reports)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tasks import fixes
from tasks.fixes import fix_for_accuracy_failure, fix_for_build_failure, fix_for_parser_error

# Exact lines as TensorRT logged them (NVIDIA/TensorRT and onnx-tensorrt issue reports).
SLICE_86 = ("ModelImporter.cpp:776: ERROR: builtin_op_importers.cpp:4519 In function importSlice: "
            "[8] Assertion failed: (axesInput.is_weights()) && \"This version of TensorRT does not support dynamic axes.\"")
TOPK = ("ERROR: builtin_op_importers.cpp:4293 In function importTopK: [8] Assertion failed: (inputs.at(1).is_weights()) "
        "&& \"This version of TensorRT only supports input K as an initializer.\"")
PLUGIN = ("ERROR: builtin_op_importers.cpp:4643 In function importFallbackPluginImporter: [8] Assertion failed: "
          "creator && \"Plugin not found, are the plugin name, version, and namespace correct?\"")
NO_IMPORTER = "[8] No importer registered for op: DCN"
SHARED_DIMS = ("[shapeContext.cpp::getBounds::3442] Error Code 4: Internal Error (2B: Input dimensions with this name "
               "are inconsistent.)")
IR = "WARNING: ONNX model has a newer ir_version (0.0.9) than this parser was built against (0.0.8)."
CLAMPED = "onnx2trt_utils.cpp:400: One or more weights outside the range of INT32 was clamped"
NO_IMPL = ("10: [optimizer.cpp::computeCosts::3869] Error Code 10: Internal Error (Could not find any implementation "
           "for node /model.0/conv/Conv + PWN(PWN(/model.0/act/Sigmoid), /model.0/act/Mul).)")
OOM = ("1: [defaultAllocator.cpp::allocate::20] Error Code 1: Cuda Runtime (out of memory)")
OOM_REQ = "Requested amount of GPU memory (34359738368 bytes) could not be allocated. There may not be enough free memory for allocation to succeed."
WORKSPACE = ("Some tactics do not have sufficient workspace memory to run. Increasing workspace size will enable more "
             "tactics, please check verbose output for requested sizes.")


def test_dynamic_axes_slice_points_at_sanitise_and_tensorrt_10_3():
    fix = fix_for_parser_error(SLICE_86, "/Slice_3", "Slice", "8.6.1")
    assert fix.code == "dynamic_axes_slice"
    assert "'/Slice_3'" in fix.fix and "constant folding" in fix.fix and "TensorRT 10.3" in fix.fix
    assert "8.6.1" in fix.limit and fix.lifted_in == "10.3"
    assert "tolerance" not in fix.fix


def test_input_that_must_be_an_initializer_names_it():
    fix = fix_for_parser_error(TOPK, "/TopK", "TopK", "8.6")
    assert fix.code == "input_must_be_constant"
    assert "input K" in fix.fix and "'/TopK' (TopK)" in fix.fix and "constant folding" in fix.fix


@pytest.mark.parametrize("desc, expected_op", [(PLUGIN, "GridSample"), (NO_IMPORTER, "DCN")])
def test_unknown_op_names_the_op_and_plugins(desc, expected_op):
    fix = fix_for_parser_error(desc, "node_7", "GridSample" if desc == PLUGIN else "", "8.6")
    assert fix.code == "plugin_op_not_found"
    assert expected_op in fix.fix and "operators.md" in fix.fix and "init_libnvinfer_plugins" in fix.fix


def test_inconsistent_named_dims_point_at_dim_renaming_in_either_stage():
    for fix in (fix_for_build_failure([OOM_REQ.replace("memory", "x"), SHARED_DIMS]),
                fix_for_parser_error(SHARED_DIMS)):
        assert fix.code == "shared_dim_inconsistent"
        assert "split_shared_dims" in fix.fix and "same min/opt/max" in fix.fix


def test_ir_too_new_points_at_lowering_and_tensorrt_10():
    fix = fix_for_parser_error(IR, trt_version="8.6")
    assert fix.code == "ir_version_too_new" and "lower_ir" in fix.fix and "10.0" in fix.fix


def test_opset_too_new_points_at_the_version_converter():
    fix = fix_for_parser_error("Opset version 19 is not supported by this parser (max 17)", trt_version="8.6")
    assert fix.code == "opset_too_new" and "version_converter" in fix.fix


def test_int32_clamping_explains_the_int64_limit():
    fix = fix_for_parser_error(CLAMPED, trt_version="8.6")
    assert fix.code == "int32_clamped" and "INT64" in fix.limit and "10.0" in fix.fix


def test_no_implementation_keeps_the_named_layer_in_float():
    fix = fix_for_build_failure(["[W] something else", NO_IMPL], trt_version="8.6", precision="int8")
    assert fix.code == "no_implementation"
    assert "/model.0/conv/Conv + PWN(PWN(/model.0/act/Sigmoid), /model.0/act/Mul)" in fix.fix
    assert "calibration.exclude_nodes" in fix.fix and "fp32" in fix.fix and "int8" in fix.limit


@pytest.mark.parametrize("line", [OOM, OOM_REQ])
def test_out_of_memory_names_the_workspace_setting(line):
    fix = fix_for_build_failure(line)
    assert fix.code == "gpu_out_of_memory" and "build.workspace_mib" in fix.fix


def test_small_workspace_says_raise_it():
    fix = fix_for_build_failure(WORKSPACE)
    assert fix.code == "workspace_too_small" and "Raise build.workspace_mib" in fix.fix


def test_timeout_names_build_timeout_s():
    fix = fix_for_build_failure("the GPU subprocess timed out after 1800 s")
    assert fix.code == "build_timeout" and "build.timeout_s" in fix.fix


def test_unknown_failures_get_a_stage_specific_fix_never_tolerances():
    parser = fix_for_parser_error("Assertion failed: something new", "n1", "Einsum", "10.3")
    assert parser.code == "parser_rejected" and "'n1' (Einsum)" in parser.fix and "10.3" in parser.fix
    builder = fix_for_build_failure([])
    assert builder.code == "build_failed"
    for fix in (parser, builder):
        assert "tolerance" not in fix.fix.lower()


def test_builder_rules_do_not_fire_on_parser_errors():
    assert fix_for_parser_error(OOM).code == "parser_rejected"


def test_only_the_accuracy_gate_suggests_loosening_tolerances():
    fix = fix_for_accuracy_failure("int8", ["min_cosine 0.97 < 0.99 on logits"])
    assert fix.code == "accuracy_gate_failed" and "loosen tolerances.int8" in fix.fix
    assert "min_cosine 0.97" in fix.fix and "exclude_nodes" in fix.fix and "add fp32" in fix.fix
    assert "add fp32" not in fix_for_accuracy_failure("fp32").fix


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="accuracy"):
        fixes.match_fix("accuracy", "x")


def test_fixes_module_stays_stdlib_only_for_the_tensorrt_interpreter():
    tree = ast.parse(Path(fixes.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "re", "dataclasses", "typing"}
    assert "from __future__ import annotations" in Path(fixes.__file__).read_text()


def test_parser_details_pick_the_error_a_rule_explains():
    errors = [{"desc": "Assertion failed: something vague", "node_name": "/Slice_3", "node_op": "Slice"},
              {"desc": SLICE_86, "node_name": "/Slice_3", "node_op": "Slice"}]
    assert fixes.fix_for_parser_details(errors, trt_version="8.6").code == "dynamic_axes_slice"
    # the telling line only in the logger's errors: the node still comes from the parser error
    fix = fixes.fix_for_parser_details(errors[:1], [CLAMPED, SLICE_86], "8.6")
    assert fix.code == "dynamic_axes_slice" and "'/Slice_3'" in fix.fix  # the assertion outranks the warning
    assert fixes.fix_for_parser_details(errors[:1], [CLAMPED], "8.6").code == "int32_clamped"
    vague = fixes.fix_for_parser_details(errors[:1], [], "8.6")
    assert vague.code == "parser_rejected" and "'/Slice_3' (Slice)" in vague.fix
    assert fixes.fix_for_parser_details([], [], "8.6").code == "parser_rejected"
