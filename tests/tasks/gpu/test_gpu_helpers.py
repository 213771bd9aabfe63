"""The pure parts of tasks/gpu (profiles, layer precisions, calibration batch checks, input casts,
eval grouping, latency stats, the subprocess protocol) and its Python 3.9 / import rules, on CPU."""
from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.errors import ModelError
from tasks.gpu.bench import latency_stats, synthetic_inputs
from tasks.gpu.build import layer_precisions, resolve_profiles
from tasks.gpu.calibrator import check_calibration_batches, npz_headers
from tasks.gpu.check import group_calls
from tasks.gpu.runtime import coerce_input

GPU_DIR = Path(__file__).resolve().parents[3] / "tasks" / "gpu"
IMAGES = {"name": "images", "shape": [-1, 3, 32, 32]}


# ---- profiles -------------------------------------------------------------------------------------

def test_default_profile_for_a_dynamic_batch():
    [profile] = resolve_profiles([IMAGES], [], default_opt_batch=8, default_max_batch=32)
    assert profile == {"images": {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [32, 3, 32, 32]}}


def test_static_inputs_get_their_shape_and_opt_is_clamped_to_max():
    [profile] = resolve_profiles([{"name": "x", "shape": [1, 4]}, {"name": "y", "shape": [-1, 2]}], [],
                                 default_opt_batch=64, default_max_batch=16)
    assert profile["x"] == {"min": [1, 4], "opt": [1, 4], "max": [1, 4]}
    assert profile["y"] == {"min": [1, 2], "opt": [16, 2], "max": [16, 2]}


def test_inputs_left_out_of_a_profile_follow_its_batch():
    inputs = [{"name": "features", "shape": [-1, 16]}, {"name": "ids", "shape": [-1, 4]}]
    [profile] = resolve_profiles(inputs, [{"features": {"min": [2, 16], "opt": [4, 16], "max": [64, 16]}}])
    assert profile["ids"] == {"min": [2, 4], "opt": [4, 4], "max": [64, 4]}


def test_several_profiles_resolve_independently():
    profiles = resolve_profiles([IMAGES], [{"images": {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [4, 3, 32, 32]}},
                                           {"images": {"min": [8, 3, 32, 32], "opt": [64, 3, 32, 32], "max": [128, 3, 32, 32]}}])
    assert [p["images"]["opt"][0] for p in profiles] == [1, 64]


def test_other_dynamic_dims_need_a_profile():
    with pytest.raises(ModelError) as err:
        resolve_profiles([{"name": "images", "shape": [-1, 3, -1, -1]}], [])
    assert "'images'" in err.value.message and "dim 2" in err.value.message
    assert err.value.fix.startswith("add a profile for images in trtflow.yaml")


@pytest.mark.parametrize("profile, words", [
    ({"pixels": {"min": [1], "opt": [1], "max": [1]}}, "no input called"),
    ({"images": {"min": [1, 3, 32], "opt": [1, 3, 32], "max": [1, 3, 32]}}, "rank"),
    ({"images": {"min": [4, 3, 32, 32], "opt": [2, 3, 32, 32], "max": [8, 3, 32, 32]}}, "min <= opt <= max"),
    ({"images": {"min": [1, 3, 64, 64], "opt": [1, 3, 64, 64], "max": [1, 3, 64, 64]}}, "fixes it at 32"),
    ({"images": {"min": [1, 3, 32, 32]}}, "needs min, opt and max"),
])
def test_bad_profiles_are_model_errors(profile, words):
    with pytest.raises(ModelError) as err:
        resolve_profiles([IMAGES], [profile])
    assert words in err.value.message and err.value.fix


# ---- engine inspector JSON -----------------------------------------------------------------------

def test_layer_precisions_from_86_style_json():
    info = {"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "images", "Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Name": "c1", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}]},
        {"Name": "conv2", "Inputs": [{"Name": "c1", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}],
         "Outputs": []},
        {"Name": "fc", "Inputs": [{"Name": "gap", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}]},
        {"Name": "cast", "Inputs": [{"Name": "ids", "Format/Datatype": "Row major linear UInt8 format"}]},
        {"Name": "shape_only", "Outputs": [{"Name": "s", "Format/Datatype": "Row major linear Int32"}]},
        "layer_without_details",
    ], "Bindings": ["images", "logits"]}
    # conv1 reads FP32 and writes INT8: an INT8 kernel with the input reformat fused in, so int8
    assert layer_precisions(json.dumps(info)) == {"int8": 2, "fp16": 1, "uint8": 1, "int32": 1, "unknown": 1}


def test_layer_precisions_from_11_style_json_and_explicit_precision():
    info = {"Layers": [{"Name": "a", "Inputs": [{"Name": "x", "DataType": "Half", "Format": "kLINEAR"}]},
                       {"Name": "b", "Precision": "INT8", "Inputs": [{"Name": "y", "DataType": "Float"}]},
                       {"Name": "c", "Inputs": [{"Name": "z", "DataType": "BFloat16"}]}]}
    assert layer_precisions(info) == {"fp16": 1, "int8": 1, "bf16": 1}
    assert layer_precisions("not json") == {}


# ---- calibration batches --------------------------------------------------------------------------

def test_calibration_batches_must_match_the_opt_shape(tmp_path):
    good, small, wrong_key = tmp_path / "good.npz", tmp_path / "small.npz", tmp_path / "key.npz"
    np.savez(good, images=np.zeros((8, 3, 32, 32), np.float32))
    np.savez(small, images=np.zeros((4, 3, 32, 32), np.float32))
    np.savez(wrong_key, pixels=np.zeros((8, 3, 32, 32), np.float32))
    opt = {"images": [8, 3, 32, 32]}
    assert npz_headers(str(good)) == {"images": ((8, 3, 32, 32), np.dtype(np.float32))}
    check_calibration_batches([str(good)], opt)
    with pytest.raises(ModelError) as err:
        check_calibration_batches([str(good), str(small)], opt)
    assert "[4, 3, 32, 32]" in err.value.message and "read past" in err.value.message
    assert "calibration.batch_size" in err.value.fix
    with pytest.raises(ModelError, match="no array for input 'images'"):
        check_calibration_batches([str(wrong_key)], opt)
    with pytest.raises(ModelError, match="needs calibration batches"):
        check_calibration_batches([], opt)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ModelError, match="not a readable .npz"):
        check_calibration_batches([str(tmp_path / "text.npz")], opt)


# ---- input casts, eval grouping, bench stats -------------------------------------------------------

def test_int64_ids_narrow_to_int32_with_an_overflow_check():
    ids = np.array([[1, 49]], dtype=np.int64)
    out = coerce_input("ids", ids, np.int32)
    assert out.dtype == np.int32 and out.tolist() == [[1, 49]] and out.flags.c_contiguous
    with pytest.raises(ModelError, match="outside the engine's int32 range"):
        coerce_input("ids", np.array([2 ** 40]), np.int32)


def test_other_casts():
    assert coerce_input("m", np.array([0, 1], np.int64), np.bool_).dtype == np.bool_
    assert coerce_input("x", np.ones(2, np.float64), np.float16).dtype == np.float16
    same = np.ones((2, 2), np.float32)
    assert coerce_input("x", same, np.float32) is same
    with pytest.raises(ModelError, match="is float32, the engine takes int32"):
        coerce_input("ids", np.ones(2, np.float32), np.int32)


def test_group_calls_orders_numerically():
    calls = group_calls(["10:images", "2:images", "2:ids", "0:images", "bare"])
    assert [c for c, _ in calls] == ["0", "2", "10"]
    assert calls[0][1] == {"images": "0:images", "bare": "bare"}
    assert calls[1][1] == {"images": "2:images", "ids": "2:ids"}


def test_latency_stats_and_synthetic_inputs():
    stats = latency_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats["min"] == 1.0 and stats["max"] == 100.0 and stats["p50"] == 3.0
    assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    feeds = synthetic_inputs({"x": np.dtype(np.float16), "ids": np.dtype(np.int32)}, {"x": [2, 3], "ids": [2, 4]})
    assert feeds["x"].dtype == np.float16 and feeds["x"].shape == (2, 3) and feeds["x"].std() > 0
    assert feeds["ids"].dtype == np.int32 and not feeds["ids"].any()


# ---- protocol -------------------------------------------------------------------------------------

def _main(tmp_path, verb, request_text):
    from tasks.gpu.__main__ import main

    req, resp = tmp_path / "req.json", tmp_path / "resp.json"
    req.write_text(request_text)
    assert main([verb, str(req), str(resp)]) == 0
    return json.loads(resp.read_text())


def test_unknown_verb_and_unreadable_request_still_answer(tmp_path):
    out = _main(tmp_path, "transmogrify", "{}")
    assert out["ok"] is False and out["error"]["kind"] == "infra" and "transmogrify" in out["error"]["message"]
    out = _main(tmp_path, "probe", "{not json")
    assert out["ok"] is False and out["error"]["kind"] == "infra" and "cannot read the GPU request" in out["error"]["message"]


# ---- the Python 3.9 and import rules of tasks/gpu ---------------------------------------------------

STDLIB = set(getattr(sys, "stdlib_module_names", ()))  # 3.10+; under 3.9 the stdlib check is skipped
ALLOWED_TOP = {"numpy", "onnx", "tensorrt", "pycuda", "cuda", "tasks", "__future__"}


def _annotation_nodes(tree: ast.AST) -> set:
    """ids of every node inside an annotation (unevaluated there, thanks to the __future__ import)."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            roots += [a.annotation for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs]
            roots += [node.args.vararg and node.args.vararg.annotation, node.args.kwarg and node.args.kwarg.annotation,
                      node.returns]
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
    return {id(n) for root in roots if root is not None for n in ast.walk(root)}


# tasks/gpu runs in the GPU worker's Python 3.9; it imports these two modules from tasks/ as well.
SHARED_WITH_GPU = [GPU_DIR.parent / "shapes.py", GPU_DIR.parent / "errors.py", GPU_DIR.parent / "fixes.py"]


@pytest.mark.parametrize("path", sorted(GPU_DIR.glob("*.py")) + SHARED_WITH_GPU, ids=lambda p: p.name)
def test_gpu_modules_follow_the_python39_rules(path):
    source = path.read_text()
    tree = ast.parse(source, feature_version=(3, 9))  # rejects match statements and other 3.10+ syntax
    assert "from __future__ import annotations" in source, f"{path.name}: annotations must stay unevaluated"
    in_annotations = _annotation_nodes(tree)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            if STDLIB:
                assert top in ALLOWED_TOP | STDLIB, f"{path.name} imports {name}"
            assert top not in {"prefect", "flows", "torch", "onnxruntime", "boto3"}, f"{path.name} imports {name}"
            if top == "tasks":
                assert name in ("tasks.errors", "tasks.shapes", "tasks.fixes") or name.startswith("tasks.gpu"), f"{path.name} imports {name}"
        # `X | Y` on types is a TypeError at runtime on 3.9 (fine inside annotations)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and id(node) not in in_annotations:
            for side in (node.left, node.right):
                assert not (isinstance(side, (ast.Name, ast.Constant)) and getattr(side, "id", None) in
                            {"int", "str", "float", "bool", "dict", "list", "bytes", "Path"}
                            or isinstance(side, ast.Constant) and side.value is None), f"{path.name}: runtime X | Y"


def test_layer_precisions_of_a_real_trt86_engine_with_dynamic_shapes():
    """layers.json captured on the H100 (TensorRT 8.6.0, small_cnn FP16 build, dynamic batch): every
    tensor format reads 'N/A due to dynamic shapes', so the precision comes from the tactic names."""
    from pathlib import Path

    from tasks.gpu.build import layer_precisions

    text = (Path(__file__).parent / "data" / "layers-trt8.6-fp16-small-cnn.json").read_text()
    counts = layer_precisions(text)
    assert counts == {"fp32": 4, "unknown": 1}  # the tiny convs won FP32 tactics; the reshape is a no-op


def test_layer_precision_from_int8_and_fp16_tactic_names():
    from tasks.gpu.build import layer_precisions

    info = {"Layers": [
        {"Name": "c1", "TacticName": "sm80_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs",
         "Inputs": [{"Format/Datatype": "N/A due to dynamic shapes"}]},
        {"Name": "c2", "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc_tilesize64x64x64"},
        {"Name": "p", "TacticName": "sm50_xmma_pooling_fw_4d_FP32FP32NCHW_Average_FastDiv"}]}
    assert layer_precisions(info) == {"int8": 1, "fp16": 1, "fp32": 1}


# Kernel names of INT8 tactics as TensorRT names them (8.6 / 10.x on Ampere and Hopper), each in a
# layer whose tensor formats say nothing (8.6 with dynamic shapes) or say FP32 for the input.
INT8_TACTICS = [
    "sm90_xmma_fprop_implicit_gemm_interleaved_i8i8_i8i32_f32_nchw_vect_c_32kcrs_vect_c_32_nchw_vect_c_32_"
    "tilesize128x128x64_stage3_warpsize2x2x1_g1_tensor16x8x32_t1r1s1",
    "sm80_xmma_gemm_i8i8_i8i32_f32_nn_n_tilesize128x128x64_stage4_warpsize2x2x1_tensor16x8x32",
    "sm75_xmma_fprop_imma_nchw_vect_c_32kcrs_vect_c_32_tilesize128x128x64",
    "sm50_xmma_pooling_fw_4d_INT8INT8NCxHWx4_Average_FastDiv",
    "trt_turing_int8x4_icudnn_int8x4_128x128_relu_exp_medium_nhwc_tn_v1",
    "sm90_xmma_fprop_implicit_gemm_indexed_Int8_nhwc_tilesize64x64x64",
    "cutlass_tensorop_i8816fprop_optimized_s8_128x128_64x2_nhwc_align16",
]


@pytest.mark.parametrize("tactic", INT8_TACTICS)
def test_int8_tactic_names_count_as_int8_whatever_the_tensor_formats_say(tactic):
    from tasks.gpu.build import layer_precisions

    for tensors in ([{"Format/Datatype": "N/A due to dynamic shapes"}], [{"Format/Datatype": "Row major linear FP32"}]):
        info = {"Layers": [{"Name": "conv1 + relu1", "TacticName": tactic, "Inputs": tensors, "Outputs": tensors}]}
        assert layer_precisions(info) == {"int8": 1}, (tactic, tensors)


def test_float_tactic_names_never_count_as_int8():
    from tasks.gpu.build import layer_precisions

    info = {"Layers": [
        {"Name": "a", "TacticName": "sm90_xmma_fprop_implicit_gemm_f32f32_f32f32_f32_nchwkcrs_nchw_tilesize32x32x8_"
                                    "stage3_warpsize1x2x1_g1_ffma_aligna4_alignc4"},
        {"Name": "b", "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc_tilesize64x64x64_"
                                    "stage4_warpsize2x2x1_g1_tensor16x8x16_aligna8"},
        {"Name": "c", "TacticName": "sm86_xmma_gemm_f16f16_f16f32_f32_nn_n_tilesize128x128x32_hmma"}]}
    assert layer_precisions(info) == {"fp32": 1, "fp16": 2}


def test_a_layer_named_int8_or_writing_int8_is_int8_and_unknown_layers_name_their_tactic():
    from tasks.gpu.build import layer_precisions, unknown_layers

    info = {"Layers": [
        {"Name": "images_int8_quantize", "TacticName": "0x0000000000000000"},
        {"Name": "reformat", "LayerType": "Reformat", "TacticName": "0x00000000000003ea",
         "Inputs": [{"Format/Datatype": "Row major linear FP32"}],
         "Outputs": [{"Format/Datatype": "Four wide channel vectorized row major Int8 format"}]},
        {"Name": "shuffle", "LayerType": "NoOp", "TacticName": "0x0000000000000000",
         "Inputs": [{"Format/Datatype": "N/A due to dynamic shapes"}]}]}
    assert layer_precisions(info) == {"int8": 2, "unknown": 1}
    assert unknown_layers(info) == [{"name": "shuffle", "type": "NoOp", "tactic": "0x0000000000000000"}]


def test_an_int8_engine_without_int8_layers_gets_a_note_naming_the_float_kernels_and_the_fix():
    from tasks.gpu.build import int8_layer_note

    note = int8_layer_note("int8", "calibrator", {"fp32": 5, "unknown": 3})
    assert note.startswith("no layer of this INT8 engine runs in INT8 (fp32 5)")
    assert "float kernels faster than INT8" in note and "calibration.mode: qdq" in note
    assert int8_layer_note("int8", "calibrator", {"int8": 1, "fp32": 4}) is None
    assert int8_layer_note("fp16", None, {"fp32": 5}) is None
    # nothing read (no inspector details): no claim either way
    assert int8_layer_note("int8", "calibrator", {"unknown": 8}) is None
    assert int8_layer_note("int8", "qdq", {}) is None
