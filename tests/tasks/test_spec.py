"""tasks/spec.py: defaults, strict keys, YAML errors, overrides and the engine-relevant build key."""
from __future__ import annotations

import pytest

from tasks.errors import ModelError
from tasks.spec import DEFAULT_TOLERANCES, ModelSpec, load_spec, parse_spec


def test_defaults():
    spec = ModelSpec()
    assert [str(p) for p in spec.precisions] == ["int8", "fp16", "fp32"]
    assert spec.strategy == "fallback" and spec.profiles == []
    assert spec.build.workspace_mib == 4096 and spec.build.default_opt_batch == 8 and spec.build.default_max_batch == 32
    assert spec.calibration.mode == "qdq" and spec.calibration.data == "calibration"
    assert spec.eval.data == "eval" and spec.eval.synthetic_samples == 8
    for precision, tol in DEFAULT_TOLERANCES.items():
        assert spec.tolerance(precision) == tol
    assert parse_spec(None) == spec and parse_spec({}) == spec


def test_load_spec_without_a_file_gives_defaults(tmp_path):
    assert load_spec(None) == ModelSpec()
    assert load_spec(tmp_path / "trtflow.yaml") == ModelSpec()
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_spec(empty) == ModelSpec()


def test_full_yaml_example(tmp_path):
    path = tmp_path / "trtflow.yaml"
    path.write_text("""
precisions: [fp16, fp32]
strategy: all
profiles:
  - images: {min: [1, 3, 224, 224], opt: [8, 3, 224, 224], max: [32, 3, 224, 224]}
tolerances:
  fp16: {min_cosine: 0.995}
calibration:
  method: entropy
  preprocess: {resize: 256, crop: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
build: {workspace_mib: 1024, optimization_level: 5}
""")
    spec = load_spec(path)
    assert [str(p) for p in spec.precisions] == ["fp16", "fp32"] and spec.strategy == "all"
    assert spec.profiles[0]["images"].opt == [8, 3, 224, 224]
    assert spec.calibration.preprocess.crop == 224 and spec.calibration.method == "entropy"
    assert spec.build.workspace_mib == 1024 and spec.build.timeout_s == 1800  # unset keys keep defaults


@pytest.mark.parametrize("data,named", [
    ({"precision": ["fp16"]}, "precision: unknown key"),
    ({"build": {"workspace": 10}}, "build.workspace: unknown key"),
    ({"calibration": {"preprocess": {"meen": [0.5]}}}, "calibration.preprocess.meen: unknown key"),
    ({"tolerances": {"int8": {"min_cos": 0.9}}}, "tolerances.int8.min_cos: unknown key"),
])
def test_unknown_keys_are_named(data, named):
    with pytest.raises(ModelError) as info:
        parse_spec(data)
    assert named in info.value.message and "trtflow.yaml" in info.value.message
    assert info.value.fix


@pytest.mark.parametrize("data,fragment", [
    ({"precisions": []}, "at least one precision"),
    ({"precisions": ["fp16", "fp16"]}, "must not repeat"),
    ({"precisions": ["int4"]}, "precisions.0"),
    ({"profiles": [{"x": {"min": [4], "opt": [2], "max": [8]}}]}, "min <= opt <= max"),
    ({"profiles": [{"x": {"min": [1, 2], "opt": [2], "max": [8]}}]}, "same rank"),
    ({"build": {"workspace_mib": 1}}, "build.workspace_mib"),
    ({"tolerances": {"fp16": {"min_cosine": 2}}}, "tolerances.fp16.min_cosine"),
])
def test_invalid_values_are_explained(data, fragment):
    with pytest.raises(ModelError, match="is not a valid trtflow spec") as info:
        parse_spec(data)
    assert fragment in info.value.message


def test_yaml_errors(tmp_path):
    bad = tmp_path / "trtflow.yaml"
    bad.write_text("precisions: [fp16\nbuild: {")
    with pytest.raises(ModelError, match="not valid YAML") as info:
        load_spec(bad)
    assert "line" in info.value.message and info.value.fix
    listy = tmp_path / "list.yaml"
    listy.write_text("- fp16\n- fp32\n")
    with pytest.raises(ModelError, match="must hold a mapping"):
        load_spec(listy)


def test_overrides_merge_over_the_file(tmp_path):
    path = tmp_path / "trtflow.yaml"
    path.write_text("precisions: [int8, fp16]\nbuild: {workspace_mib: 1024}\ncalibration: {method: entropy}\n")
    spec = load_spec(path, {"precisions": ["fp32"], "build": {"optimization_level": 5}, "strategy": None,
                            "calibration": {"method": None}})
    assert [str(p) for p in spec.precisions] == ["fp32"]  # lists replace
    assert spec.build.workspace_mib == 1024 and spec.build.optimization_level == 5  # mappings merge
    assert spec.strategy == "fallback" and spec.calibration.method == "entropy"  # None keeps what was there


def test_override_errors_name_the_key():
    with pytest.raises(ModelError, match="build.colour: unknown key"):
        parse_spec({}, {"build": {"colour": "red"}})


def test_tolerance_override_merges_over_the_default():
    spec = parse_spec({"tolerances": {"int8": {"min_cosine": 0.95}, "fp32": {"max_abs": 0.001}}})
    int8 = spec.tolerance("int8")
    assert int8.min_cosine == 0.95 and int8.min_top1 == DEFAULT_TOLERANCES["int8"].min_top1
    fp32 = spec.tolerance("fp32")
    assert fp32.max_abs == 0.001 and fp32.min_cosine == DEFAULT_TOLERANCES["fp32"].min_cosine
    assert spec.tolerance("fp16") == DEFAULT_TOLERANCES["fp16"]


def test_build_key_is_stable_and_ignores_only_bench_settings(tmp_path):
    base = parse_spec({"build": {"workspace_mib": 1024}, "calibration": {"method": "entropy"}})
    a = tmp_path / "a.yaml"
    a.write_text("calibration: {method: entropy}\nbuild: {workspace_mib: 1024}\n")
    assert load_spec(a).build_key() == base.build_key()  # key order does not matter
    assert len(base.build_key()) == 12 and base.build_key() != ModelSpec().build_key()
    # defaults (enum members) and the same values parsed from YAML (strings) hash alike
    assert parse_spec({"precisions": ["int8", "fp16", "fp32"]}).build_key() == ModelSpec().build_key()
    assert parse_spec({"bench": {"iterations": 5, "enabled": False}}).build_key() == ModelSpec().build_key()
    keys = {ModelSpec().build_key()}
    for change in ({"build": {"optimization_level": 5}}, {"calibration": {"method": "percentile"}},
                   {"profiles": [{"images": {"min": [1, 3, 8, 8], "opt": [1, 3, 8, 8], "max": [1, 3, 8, 8]}}]},
                   {"precisions": ["fp16"]}, {"tolerances": {"fp16": {"min_cosine": 0.9}}}, {"eval": {"seed": 3}}):
        keys.add(parse_spec(change).build_key())
    assert len(keys) == 7  # every change gives its own key


def test_precisions_print_as_their_values():
    # Defaults are enum members, parsed values strings: the flow formats both into keys and logs.
    assert [str(p) for p in ModelSpec().precisions] == ["int8", "fp16", "fp32"]
    assert [f"{p}" for p in parse_spec({"precisions": ["fp16"]}).precisions] == ["fp16"]
    assert ModelSpec().tolerance(ModelSpec().precisions[0]) == DEFAULT_TOLERANCES["int8"]


def test_spec_is_immutable():
    spec = ModelSpec()
    with pytest.raises(Exception):
        spec.build.workspace_mib = 1  # frozen: a spec cannot change under a running flow


def test_bench_keys_reach_the_gpu_request_and_stay_out_of_the_build_key():
    spec = parse_spec({"bench": {"sweep": [1, 8, 64], "p99_target_ms": 7.5, "cuda_graph": False, "window_ms": 500}})
    req = spec.bench.gpu_request()
    assert req["sweep"] == [1, 8, 64] and req["p99_target_ms"] == 7.5 and req["cuda_graph"] is False
    assert req["window_ms"] == 500 and req["warmup_ms"] == 200 and req["layer_times"] is False
    assert "enabled" not in req and "ort_iterations" not in req
    assert spec.build_key() == ModelSpec().build_key()
    assert parse_spec({"bench": {"enabled": False}}).bench.gpu_request() is None
    assert ModelSpec().bench.sweep is True
    with pytest.raises(Exception, match="p99_target_ms"):
        parse_spec({"bench": {"p99_target_ms": -1}})
