"""Accuracy: eval inputs, ONNX Runtime reference outputs, and their comparison with engine outputs.

Eval data lives in the package's ``eval/`` folder (``spec.eval.data``): ``<input name>.npy`` files
or ``.npz`` files keyed by input name, each array with a leading sample dim. Without it, seeded
synthetic inputs are made at the first profile's opt shape and flagged ``synthetic``.

On disk, inputs and outputs use the GPU protocol's format: one ``.npz`` whose keys are
``"<call>:<tensor name>"``; call ``i`` holds the full tensors of one inference (a batch).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from tasks.limits import load_npy, load_npz
from tasks.cpu_threads import cpu_threads, session_options
from tasks.errors import ModelError
from tasks.metrics import GateResult, OutputMetrics, compare_outputs, gate
from tasks.package import LocalPackage
from tasks.spec import SPEC_FILENAME, ModelSpec
from tasks.shapes import SYNTHETIC_INT_HIGH, ResolvedProfile, TensorInfo, model_io, synthetic_array
from tasks.validate import ValidationReport, load_model_proto, resolve_profiles

log = logging.getLogger(__name__)



# ---- the npz protocol ---------------------------------------------------------------------------
def call_key(call: int, name: str) -> str:
    return f"{call}:{name}"


def save_calls(path: Path, calls: Sequence[Mapping[str, np.ndarray]]) -> Path:
    """Write ``calls`` (one dict of tensors per inference) as ``"<i>:<name>"`` keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {call_key(i, name): np.ascontiguousarray(a) for i, tensors in enumerate(calls) for name, a in tensors.items()}
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a path without it
        np.savez(f, **arrays)
    return path


def load_calls(path: Path) -> List[Dict[str, np.ndarray]]:
    """The calls of a ``"<i>:<name>"`` npz, in call order."""
    calls: Dict[int, Dict[str, np.ndarray]] = {}
    with np.load(Path(path), allow_pickle=False) as npz:
        for key in npz.files:
            index, sep, name = key.partition(":")
            if not sep or not index.isdigit():
                raise ModelError(f"{Path(path).name}: key {key!r} is not '<call>:<tensor name>'.",
                                 fix="Write one key per call and tensor, e.g. '0:images'.")
            calls.setdefault(int(index), {})[name] = npz[key]
    if sorted(calls) != list(range(len(calls))):
        raise ModelError(f"{Path(path).name}: calls {sorted(calls)} are not numbered 0..{len(calls) - 1}.",
                         fix="Number the calls from 0 without gaps.")
    return [calls[i] for i in range(len(calls))]


# ---- eval inputs --------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """Eval inputs written to ``path`` (npz ``"<i>:<input>"``)."""

    path: Path
    synthetic: bool
    calls: int
    samples: int
    shapes: Dict[str, List[int]]  # input -> shape in call 0
    dtypes: Dict[str, str]
    source: str  # "eval/ (2 files)" or "synthetic, seed 0"
    seed: Optional[int] = None

    def load(self) -> List[Dict[str, np.ndarray]]:
        return load_calls(self.path)

    def call(self, i: int = 0) -> Dict[str, np.ndarray]:
        with np.load(self.path, allow_pickle=False) as npz:
            prefix = f"{i}:"
            return {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _opt_shapes(inputs: List[TensorInfo], profile: ResolvedProfile) -> Dict[str, List[int]]:
    out: Dict[str, List[int]] = {}
    for t in inputs:
        if t.name in profile:
            out[t.name] = list(profile[t.name]["opt"])
        elif t.shape is not None and not t.dynamic_dims:
            out[t.name] = [int(d) for d in t.shape]  # type: ignore[arg-type]
        else:
            raise ModelError(f"input {t.name!r} {t.shape_text()} is dynamic but the profile gives it no opt shape.",
                             fix=f"Add {t.name!r} to the profiles in {SPEC_FILENAME}.")
    return out


def _profiles(inputs: List[TensorInfo], spec: ModelSpec, model_path: Path,
              profiles: Optional[List[ResolvedProfile]]) -> List[ResolvedProfile]:
    if profiles is not None:
        return [{n: dict(r) for n, r in p.items()} for p in profiles]
    report = ValidationReport(model_path=str(model_path), trt_version="-")
    resolved = resolve_profiles(inputs, spec, report)
    report.raise_for_errors()
    return resolved


def _int_highs(model: onnx.ModelProto) -> Dict[str, int]:
    """Upper bound (exclusive) for integer inputs that index a constant table (Gather indices):
    the table's rows when it has fewer than SYNTHETIC_INT_HIGH."""
    inits = {t.name: t for t in model.graph.initializer}
    highs: Dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in inits:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = list(inits[node.input[0]].dims)
            if dims:
                rows = int(dims[axis % len(dims)])
                highs[node.input[1]] = min(highs.get(node.input[1], SYNTHETIC_INT_HIGH), rows)
    return highs


def _synthetic(shape: List[int], dtype: np.dtype, rng: np.random.Generator, int_high: int) -> np.ndarray:
    try:
        return synthetic_array(shape, dtype, rng, int_high)
    except TypeError:
        raise ModelError(f"cannot make synthetic data of dtype {dtype}.",
                         fix="Provide eval data in the package's eval/ folder.") from None


def _np_dtype(t: TensorInfo) -> np.dtype:
    try:
        return t.np_dtype()
    except TypeError:
        raise ModelError(f"input {t.name!r} has dtype {t.dtype}, which trtflow cannot feed.",
                         fix="Export the model with numeric inputs.") from None


def _read_eval_files(folder: Path, names: List[str]) -> Tuple[Dict[str, List[np.ndarray]], List[str]]:
    arrays: Dict[str, List[np.ndarray]] = {}
    used: List[str] = []
    for f in sorted(folder.iterdir()):
        if f.suffix == ".npy" and f.stem in names:
            arrays.setdefault(f.stem, []).append(load_npy(f, f"eval/{f.name}"))
            used.append(f.name)
        elif f.suffix == ".npz":
            # load_npz refuses pickled arrays and members that would inflate past limits.max_array_mib
            npz = load_npz(f, f"eval/{f.name}")
            keys = [k for k in npz if k in names]
            for k in keys:
                arrays.setdefault(k, []).append(npz[k])
            if keys:
                used.append(f.name)
    return arrays, used


def _cast(arr: np.ndarray, dtype: np.dtype, name: str, source: str) -> np.ndarray:
    if arr.dtype == dtype:
        return arr
    if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
        raise ModelError(f"{source}: input {name!r} holds {arr.dtype} data, the model takes {dtype}.",
                         fix=f"Save {name!r} as {dtype}.")
    return arr.astype(dtype)


def _fits(shape: Sequence[int], t: TensorInfo, prof: Optional[Dict[str, List[int]]], skip_batch: bool) -> bool:
    start = 1 if skip_batch else 0
    for i in range(start, len(shape)):
        if prof is not None:
            if not prof["min"][i] <= shape[i] <= prof["max"][i]:
                return False
        elif t.shape is not None and isinstance(t.shape[i], int) and shape[i] != t.shape[i]:
            return False
    return True


def _from_folder(folder: Path, inputs: List[TensorInfo], profile: ResolvedProfile, opt: Dict[str, List[int]],
                 max_samples: int) -> Tuple[List[Dict[str, np.ndarray]], int, str]:
    names = [t.name for t in inputs]
    arrays, used = _read_eval_files(folder, names)
    source = f"{folder.name}/"
    missing = [n for n in names if n not in arrays]
    if missing:
        raise ModelError(f"{source} has no data for input(s) {', '.join(map(repr, missing))} "
                         f"(found: {', '.join(used) or 'no .npy/.npz files named after inputs'}).",
                         fix=f"Add '<input name>.npy' files, or .npz files keyed by input name, with a leading "
                             f"sample dim, to {source}; or remove the folder to use synthetic inputs.")
    data: Dict[str, np.ndarray] = {}
    modes = set()
    for t in inputs:
        rank = len(t.shape or [])
        parts = arrays[t.name]
        if any(a.ndim not in (rank, rank + 1) for a in parts) or len({a.ndim for a in parts}) > 1:
            raise ModelError(f"{source}: arrays for input {t.name!r} have ranks {[a.ndim for a in parts]}; the "
                             f"input {t.shape_text()} needs rank {rank} (samples are batch rows) or {rank + 1} "
                             f"(one full tensor per sample).", fix=f"Save {t.name!r} with a leading sample dim.")
        mode = "rows" if parts[0].ndim == rank else "calls"
        modes.add(mode)
        try:
            arr = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        except ValueError as err:
            raise ModelError(f"{source}: the files for input {t.name!r} cannot be joined: {err}.",
                             fix="Give every file the same per-sample shape.") from None
        data[t.name] = _cast(arr, _np_dtype(t), t.name, source)
    if len(modes) > 1:
        raise ModelError(f"{source}: some inputs are saved as batch rows and others as one tensor per sample.",
                         fix="Save every input the same way (a leading sample dim).")
    mode = modes.pop()
    counts = {n: int(a.shape[0]) for n, a in data.items()}
    if len(set(counts.values())) > 1:
        raise ModelError(f"{source}: inputs hold different numbers of samples: {counts}.",
                         fix="Give every input the same number of samples, in the same order.")
    samples = min(next(iter(counts.values())), max_samples)
    if samples == 0:
        raise ModelError(f"{source} holds zero samples.", fix="Add samples or remove the folder.")
    calls: List[Dict[str, np.ndarray]] = []
    if mode == "calls":
        for j in range(samples):
            call = {n: a[j] for n, a in data.items()}
            for t in inputs:
                if not _fits(call[t.name].shape, t, profile.get(t.name), skip_batch=False):
                    raise ModelError(f"{source}: sample {j} of input {t.name!r} has shape {list(call[t.name].shape)}, "
                                     f"outside what the model/profile takes ({_range_text(t, profile)}).",
                                     fix=f"Save samples within the profile in {SPEC_FILENAME}, or widen it.")
            calls.append(call)
        return calls, samples, source + f" ({', '.join(used)})"
    first = inputs[0]
    batch = opt[first.name][0] if opt[first.name] else 1
    prof0 = profile.get(first.name)
    min_batch = prof0["min"][0] if prof0 else batch
    static_batch = prof0 is None
    for t in inputs:
        sample_shape = data[t.name].shape
        if not _fits(sample_shape, t, profile.get(t.name), skip_batch=True):
            raise ModelError(f"{source}: input {t.name!r} samples have shape {list(sample_shape[1:])}, outside what "
                             f"the model/profile takes ({_range_text(t, profile)}).",
                             fix=f"Save samples within the profile in {SPEC_FILENAME}, or widen it.")
    if static_batch and samples < batch:
        raise ModelError(f"{source} holds {samples} sample(s); the model's fixed batch is {batch}.",
                         fix=f"Provide at least {batch} samples.")
    for start in range(0, samples, batch):
        stop = min(start + batch, samples)
        if stop - start < (batch if static_batch else min_batch):
            break  # a last partial batch the engine cannot take
        calls.append({n: a[start:stop] for n, a in data.items()})
    used_samples = sum(next(iter(c.values())).shape[0] for c in calls)
    return calls, used_samples, source + f" ({', '.join(used)})"


def _range_text(t: TensorInfo, profile: ResolvedProfile) -> str:
    r = profile.get(t.name)
    if r is None:
        return f"shape {t.shape_text()}"
    return f"min {r['min']}, max {r['max']}"


def eval_inputs(local_package: LocalPackage, spec: ModelSpec, model_path: Optional[Path] = None,
                profiles: Optional[List[ResolvedProfile]] = None, out_path: Optional[Path] = None, *,
                model: Optional[onnx.ModelProto] = None) -> EvalSet:
    """Eval inputs for the accuracy check, written as one ``"<i>:<input>"`` npz.

    Args:
        local_package: the downloaded package (its ``spec.eval.data`` folder is read when present).
        spec: the package's spec (eval.* settings; profiles when ``profiles`` is None).
        model_path: the model to feed (default: the package's model).
        profiles: resolved profiles (``ValidationReport.profiles``); the first one's opt shapes are
            used. None resolves them from the spec.
        out_path: where to write the npz (default: ``<workdir>/<name>.eval.inputs.npz``).
        model: ``model_path`` already loaded (without external data), so it is not parsed again.
    Raises:
        ModelError: eval data that does not fit the model.
    """
    model_path = Path(model_path or local_package.model_path)
    model = model if model is not None else load_model_proto(model_path)
    inputs = model_io(model).inputs
    resolved = _profiles(inputs, spec, model_path, profiles)
    profile = resolved[0] if resolved else {}
    opt = _opt_shapes(inputs, profile)
    out_path = Path(out_path) if out_path else local_package.root.parent / f"{local_package.name}.eval.inputs.npz"
    folder = local_package.data_dir(spec.eval.data)
    if folder is not None and any(folder.iterdir()):
        calls, samples, source = _from_folder(folder, inputs, profile, opt, spec.eval.max_samples)
        synthetic, seed = False, None
    else:
        seed = spec.eval.seed
        rng = np.random.default_rng(seed)
        highs = _int_highs(model)
        first = opt[inputs[0].name] if inputs else []
        batch = first[0] if first else 1
        n_calls = max(1, math.ceil(spec.eval.synthetic_samples / batch))
        calls = [{t.name: _synthetic(opt[t.name], _np_dtype(t), rng, highs.get(t.name, SYNTHETIC_INT_HIGH))
                  for t in inputs} for _ in range(n_calls)]
        samples = n_calls * batch
        synthetic, source = True, f"synthetic, seed {seed}"
        log.info("no eval data in %s/: %d synthetic call(s) at the opt shapes %s", spec.eval.data, n_calls, opt)
    save_calls(out_path, calls)
    return EvalSet(path=out_path, synthetic=synthetic, calls=len(calls), samples=samples,
                   shapes={n: list(a.shape) for n, a in calls[0].items()},
                   dtypes={n: str(a.dtype) for n, a in calls[0].items()}, source=source, seed=seed)


# ---- ONNX Runtime -------------------------------------------------------------------------------
def _ort_errors() -> tuple:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n))


def _session(model_path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = session_options(threads or None)
    try:
        return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except _ort_errors() as err:
        raise ModelError(f"ONNX Runtime cannot load {Path(model_path).name}: {str(err)[:500]}",
                         fix="Validate the model (trtflow validate) and re-export it if ONNX Runtime rejects it.") from None


def _run(sess, feeds: Mapping[str, np.ndarray], what: str) -> Dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, dict(feeds))
    except _ort_errors() as err:
        shapes = {n: list(a.shape) for n, a in feeds.items()}
        raise ModelError(f"ONNX Runtime failed on {what} (inputs {shapes}): {str(err)[:500]}",
                         fix="Check that the eval inputs' shapes and dtypes match the model's inputs.") from None
    return dict(zip(names, values))


def reference_outputs(model_path: Path, eval_set: EvalSet, out_path: Optional[Path] = None) -> Path:
    """Run every eval call through ONNX Runtime (CPU); write the outputs as ``"<i>:<output>"`` npz."""
    if out_path is None:
        stem = eval_set.path.name
        stem = stem[:-len(".inputs.npz")] if stem.endswith(".inputs.npz") else Path(stem).stem
        out_path = eval_set.path.parent / f"{stem}.reference.npz"
    sess = _session(Path(model_path))
    outputs = [_run(sess, call, f"eval call {i}") for i, call in enumerate(eval_set.load())]
    return save_calls(Path(out_path), outputs)


def reference_from_package(local_package: LocalPackage, spec: ModelSpec,
                           profiles: Optional[List[ResolvedProfile]] = None
                           ) -> Tuple[EvalSet, Path, Optional[Dict[str, Any]]]:
    """The package's eval inputs, ONNX Runtime's outputs for them and (``bench.enabled``) its CPU
    latency: one heavy CPU stage, which the flow runs under ``spec.limits`` (tasks/limits.run_limited;
    one child, not two: each child interpreter costs about a second)."""
    eval_set = eval_inputs(local_package, spec, local_package.model_path, profiles)
    reference = reference_outputs(local_package.model_path, eval_set)
    ort = None
    if spec.bench.enabled and profiles:
        ort = ort_latency(local_package.model_path, profiles[0], spec.bench.ort_iterations)
    return eval_set, reference, ort


def _joined(calls: List[Dict[str, np.ndarray]], name: str) -> Tuple[Optional[np.ndarray], List[int]]:
    present = [i for i, c in enumerate(calls) if name in c]
    parts = [calls[i][name] for i in present]
    if not parts:
        return None, present
    if parts[0].ndim == 0:
        return np.stack(parts), present
    try:
        return np.concatenate(parts, axis=0), present
    except ValueError:
        return None, present


def compare_npz(reference_npz: Path, actual_npz: Path) -> Dict[str, OutputMetrics]:
    """Per-output metrics over all calls (concatenated along the batch dim)."""
    ref_calls = load_calls(reference_npz)
    act_calls = load_calls(actual_npz)
    names: List[str] = []
    for c in ref_calls:
        names.extend(n for n in c if n not in names)
    reference: Dict[str, np.ndarray] = {}
    actual: Dict[str, np.ndarray] = {}
    broken: Dict[str, OutputMetrics] = {}
    for name in names:
        ref, ref_present = _joined(ref_calls, name)
        act, act_present = _joined(act_calls, name)
        if ref is None:
            continue
        reference[name] = ref
        if not act_present:
            continue  # compare_outputs reports it missing
        if act_present != ref_present:
            broken[name] = OutputMetrics(name=name, shape=[], reference_shape=list(ref.shape), dtype=str(ref.dtype),
                                         error=f"the engine answered calls {act_present} of {ref_present}")
        elif act is None:
            broken[name] = OutputMetrics(name=name, shape=[], reference_shape=list(ref.shape), dtype=str(ref.dtype),
                                         error="the engine's outputs for the calls have differing shapes")
        else:
            actual[name] = act
    metrics = compare_outputs(reference, actual)
    metrics.update(broken)
    return metrics


def check_accuracy(reference_npz: Path, actual_npz: Path, tolerance: Any) -> GateResult:
    """``gate(compare_npz(...), tolerance)``: truthy when every output passes."""
    return gate(compare_npz(reference_npz, actual_npz), tolerance)


def latency_inputs(model_path: Path, inputs: Union[Mapping[str, Any], EvalSet], seed: int = 0, *,
                   model: Optional[onnx.ModelProto] = None) -> Dict[str, np.ndarray]:
    """Feeds for a latency run: an EvalSet's first call, a dict of arrays as given, or a resolved
    profile (input -> {"min", "opt", "max"}) turned into seeded synthetic inputs at its opt shapes."""
    if isinstance(inputs, EvalSet):
        return inputs.call(0)
    values = list(inputs.values())
    if values and all(isinstance(v, Mapping) and "opt" in v for v in values):
        model = model if model is not None else load_model_proto(Path(model_path))
        model_inputs = model_io(model).inputs
        opt = _opt_shapes(model_inputs, {n: dict(r) for n, r in inputs.items()})
        rng = np.random.default_rng(seed)
        highs = _int_highs(model)
        return {t.name: _synthetic(opt[t.name], _np_dtype(t), rng, highs.get(t.name, SYNTHETIC_INT_HIGH))
                for t in model_inputs}
    return {n: np.asarray(a) for n, a in inputs.items()}


def ort_latency(model_path: Path, inputs: Union[Mapping[str, Any], EvalSet], iterations: int = 20,
                warmup: int = 3, threads: int = 0, *, model: Optional[onnx.ModelProto] = None) -> Dict[str, Any]:
    """ONNX Runtime CPU latency at one input set (the opt shape): the baseline of the speedup figure.

    Args:
        inputs: see ``latency_inputs`` (arrays, an EvalSet, or a resolved profile).
    Returns:
        p50/p90/mean/min in ms, throughput in samples/s (batch = dim 0 of the first input), and
        what ran it.
    """
    import onnxruntime as ort

    feeds = latency_inputs(model_path, inputs, model=model)
    sess = _session(Path(model_path), threads)
    for _ in range(max(0, warmup)):
        _run(sess, feeds, "the latency inputs")
    times: List[float] = []
    for _ in range(max(1, iterations)):
        t0 = time.perf_counter()
        _run(sess, feeds, "the latency inputs")
        times.append((time.perf_counter() - t0) * 1000.0)
    first = next(iter(feeds.values()), np.zeros(()))
    batch = int(first.shape[0]) if first.ndim else 1
    p50 = float(np.percentile(times, 50))
    return {"p50_ms": p50, "p90_ms": float(np.percentile(times, 90)), "mean_ms": float(np.mean(times)),
            "min_ms": float(np.min(times)), "throughput": batch / (p50 / 1000.0) if p50 > 0 else None,
            "batch": batch, "iterations": len(times), "warmup": warmup, "provider": "CPUExecutionProvider",
            "threads": threads or cpu_threads() or os.cpu_count(), "onnxruntime": ort.__version__,
            "shapes": {n: list(a.shape) for n, a in feeds.items()}}
