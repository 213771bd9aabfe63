"""INT8 calibration data: read it from the model package, check it against the model, hand it out.

Sources, in the package's ``calibration/`` folder (``calibration.data`` in the spec), read in sorted
path order (sub-folders included):

- ``*.npy``: one input's samples. Which input: the file's stem when it names an input, else
  ``calibration.input``, else the model's only input.
- ``*.npz``: arrays keyed by input name; every file holds every input, with equal sample counts.
- ``*.jpg``, ``*.jpeg``, ``*.png``: images for the image input (``calibration.input`` or the first
  input), turned into tensors by ``calibration.preprocess`` (see :func:`preprocess_image`).

An array either has a leading sample dim (rank = the input's rank) or is one sample (rank - 1).
Samples are concatenated and capped at ``calibration.max_samples`` (files past the cap are not
read). ``CalibrationData.sha256`` covers the bytes of the files used plus the recipe that turned
them into tensors, so it is a cache key for Q/DQ models and calibration caches.

Without data, INT8 needs ``calibration.synthetic: true``: seeded random inputs at the calibration
profile's opt shape, flagged ``synthetic`` with a ``note`` that accuracy is not representative.

numpy and Pillow (for images) only; Prefect appears in the thin @task wrapper at the end, and only
when installed: the TensorRT interpreter (Python 3.9) imports this module without it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tasks.limits import load_npy, load_npz
from tasks.errors import ModelError
from tasks.shapes import SYNTHETIC_RULE, Dim, TensorInfo, default_batch_range, model_io, synthetic_inputs
from tasks.spec import Calibration, ModelSpec, Preprocess

log = logging.getLogger("trtflow.calibration")

ARRAY_SUFFIXES = (".npy", ".npz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SYNTHETIC_SEED = 0
SYNTHETIC_NOTE = ("calibrated on synthetic random inputs (calibration.synthetic: true): INT8 accuracy numbers are "
                  "not representative of real data")
NO_DATA_FIX = "add calibration/*.npy|*.npz|*.jpg to the package or set calibration.synthetic: true"
_RECIPE_VERSION = 1  # bump when the loading rules change what tensors the same files give



# ---- model inputs ---------------------------------------------------------------------------------
InputInfo = TensorInfo  # the one description of a model input (tasks/shapes.py); the old name stays for callers


def as_input_info(item: Any) -> TensorInfo:
    """A :class:`TensorInfo` from an IOInfo-like object or a dict with name, dtype (or elem_type), shape."""
    return TensorInfo.from_any(item)


def inputs_from_onnx(model: Any) -> List[TensorInfo]:
    """The graph inputs (initializers aside) of an already-loaded ONNX model, or of a model path."""
    return model_io(model).inputs


def _static(d: Dim) -> bool:
    return isinstance(d, (int, np.integer)) and int(d) > 0


# ---- the data -------------------------------------------------------------------------------------
@dataclass
class CalibrationData:
    """Calibration samples per input name (leading sample dim), with a content hash for cache keys."""

    arrays: Dict[str, np.ndarray]
    sha256: str
    synthetic: bool = False
    note: Optional[str] = None
    sources: List[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0

    @property
    def input_names(self) -> List[str]:
        return list(self.arrays)

    def take(self, indices: Sequence[int]) -> Dict[str, np.ndarray]:
        """The samples at ``indices`` of every input (a batch)."""
        idx = np.asarray(indices, dtype=np.int64)
        return {name: np.ascontiguousarray(a[idx]) for name, a in self.arrays.items()}

    def record(self) -> dict:
        """A small JSON-able summary (manifests, Prefect results)."""
        rec = {"sha256": self.sha256, "samples": self.samples, "synthetic": self.synthetic,
               "inputs": {k: {"shape": list(v.shape[1:]), "dtype": v.dtype.name} for k, v in self.arrays.items()},
               "sources": len(self.sources)}
        if self.note:
            rec["note"] = self.note
        return rec


# ---- preprocessing --------------------------------------------------------------------------------
def _pair(value: Union[int, Sequence[int]], what: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ModelError(f"calibration.preprocess.{what} must be one size or [height, width], got {list(value)}.",
                         fix=f"Write {what}: 224 or {what}: [224, 224].")
    return int(value[0]), int(value[1])


def preprocess_image(image: Any, pp: Preprocess, size: Optional[Tuple[int, int]] = None,
                     channels: int = 3) -> np.ndarray:
    """One image (path or PIL image) as a tensor of one sample, following ``pp``.

    Steps, in order: convert to RGB (or L when ``channels == 1``); resize (``resize: s`` scales the
    shorter side to ``s`` keeping the aspect ratio, ``[h, w]`` resizes to exactly that, bilinear);
    centre crop (``crop: s`` or ``[h, w]``); when neither resize nor crop is given and ``size``
    (the model's [h, w]) is known, resize straight to ``size``; multiply by ``scale``; reorder
    channels to ``channel_order`` (bgr reverses RGB); subtract ``mean`` and divide by ``std`` (given
    per channel in the output channel order); transpose to ``layout``; cast to ``dtype``.

    For ``dtype: uint8`` the default ``scale`` (1/255) is not applied, since bytes are wanted; an
    explicit ``scale`` is.

    Returns:
        [C, H, W] for nchw, [H, W, C] for nhwc.
    """
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.open(image)
    img = img.convert("L" if channels == 1 else "RGB")
    if pp.resize is not None:
        if isinstance(pp.resize, int):
            w, h = img.size
            short = min(w, h)
            new_w, new_h = max(1, round(w * pp.resize / short)), max(1, round(h * pp.resize / short))
        else:
            new_h, new_w = _pair(pp.resize, "resize")
        img = img.resize((new_w, new_h), Image.BILINEAR)
    if pp.crop is not None:
        ch, cw = _pair(pp.crop, "crop")
        w, h = img.size
        if ch > h or cw > w:
            raise ModelError(f"calibration.preprocess.crop {[ch, cw]} is larger than the image ({h}x{w} after resize).",
                             fix="Resize to at least the crop size (preprocess.resize) or crop less.")
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
    if pp.resize is None and pp.crop is None and size is not None and (img.size[1], img.size[0]) != tuple(size):
        img = img.resize((int(size[1]), int(size[0])), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    scale = pp.scale
    if pp.dtype == "uint8" and "scale" not in pp.model_fields_set:
        scale = 1.0
    x = x * np.float32(scale)
    if pp.channel_order == "bgr":
        x = x[:, :, ::-1]
    nch = x.shape[2]
    for what, values in (("mean", pp.mean), ("std", pp.std)):
        if values is not None and len(values) not in (1, nch):
            raise ModelError(f"calibration.preprocess.{what} has {len(values)} values for {nch}-channel images.",
                             fix=f"Give one value or {nch} values (in {pp.channel_order} order).")
    if pp.mean is not None:
        x = x - np.asarray(pp.mean, dtype=np.float32)
    if pp.std is not None:
        std = np.asarray(pp.std, dtype=np.float32)
        if np.any(std == 0):
            raise ModelError("calibration.preprocess.std contains 0.", fix="Use non-zero standard deviations.")
        x = x / std
    if pp.layout == "nchw":
        x = x.transpose(2, 0, 1)
    if pp.dtype == "uint8":
        x = np.clip(np.rint(x), 0, 255)
    return np.ascontiguousarray(x.astype(pp.dtype))


def _image_geometry(info: InputInfo, pp: Preprocess, opt: Optional[Sequence[int]]) -> Tuple[Optional[Tuple[int, int]], int]:
    """(model [h, w] if known, channel count) of an image input under ``pp.layout``."""
    shape = list(info.shape)
    if len(shape) != 4:
        raise ModelError(f"images in calibration/ need a rank-4 image input, but input {info.name!r} has shape {shape}.",
                         fix="Save the calibration samples as .npy/.npz keyed by input name instead of images, or "
                             "name the image input in calibration.input.")
    dims = [int(d) if _static(d) else (int(opt[i]) if opt is not None else None) for i, d in enumerate(shape)]
    h, w, c = (dims[2], dims[3], dims[1]) if pp.layout == "nchw" else (dims[1], dims[2], dims[3])
    size = (h, w) if h is not None and w is not None else None
    return size, (c if c in (1, 3) else 3)


# ---- loading --------------------------------------------------------------------------------------
def _opt_shapes(spec: Optional[ModelSpec], profiles: Optional[Sequence[Mapping[str, Any]]]) -> Dict[str, List[int]]:
    """Opt shape per input of the calibration profile (the first), from resolved profiles or the spec."""
    if profiles:
        first = profiles[0]
        return {name: list(rng["opt"] if isinstance(rng, Mapping) else rng.opt) for name, rng in first.items()}
    if spec is not None and spec.profiles:
        return {name: list(rng.opt) for name, rng in spec.profiles[0].items()}
    return {}


def _sample_shape_problem(info: InputInfo, sample_shape: Tuple[int, ...]) -> Optional[str]:
    expected = list(info.shape[1:])
    if len(sample_shape) != len(expected):
        return f"samples of rank {len(sample_shape)} (shape {list(sample_shape)}), the model wants {expected} per sample"
    for got, want in zip(sample_shape, expected):
        if _static(want) and int(want) != got:
            return f"samples of shape {list(sample_shape)}, the model wants {expected} per sample"
    return None


def _conform(info: InputInfo, array: np.ndarray, source: str) -> np.ndarray:
    """``array`` with a leading sample dim and the input's dtype, or a ModelError naming the mismatch."""
    rank = len(info.shape)
    if array.ndim == rank - 1:
        array = array[None]
    elif array.ndim != rank:
        raise ModelError(f"{source} gives input {info.name!r} an array of shape {list(array.shape)}; the input has "
                         f"shape {list(info.shape)} (expected rank {rank} with a leading sample dim, or {rank - 1} "
                         f"for one sample).", fix=f"Save arrays shaped [samples, {', '.join(map(str, info.shape[1:]))}].")
    problem = _sample_shape_problem(info, tuple(array.shape[1:]))
    if problem:
        raise ModelError(f"{source} gives input {info.name!r} {problem}.",
                         fix=f"Save arrays shaped [samples, {', '.join(map(str, info.shape[1:]))}] for {info.name!r}.")
    want = np.dtype(info.dtype)
    have = array.dtype
    same_kind = (have.kind == want.kind or (have.kind in "iu" and want.kind in "iu")
                 or (have.kind == "f" and want.kind == "f"))
    if not same_kind:
        fix = (f"Set calibration.preprocess.dtype: {want.name}." if "preprocess" in source else
               f"Save the tensors exactly as the model takes them ({want.name}, preprocessed), or use images with "
               f"calibration.preprocess.")
        raise ModelError(f"{source} holds {have.name} data for input {info.name!r}, which is {want.name}.", fix=fix)
    return np.ascontiguousarray(array.astype(want, copy=False))


def _resolve_single_input(spec: ModelSpec, infos: Dict[str, InputInfo], source: str, stem: Optional[str]) -> InputInfo:
    if stem is not None and stem in infos:
        return infos[stem]
    if spec.calibration.input:
        if spec.calibration.input not in infos:
            raise ModelError(f"calibration.input names {spec.calibration.input!r}, which the model has no input called.",
                             fix=f"Use one of: {', '.join(infos)}.")
        return infos[spec.calibration.input]
    if len(infos) == 1:
        return next(iter(infos.values()))
    raise ModelError(f"{source} does not say which input it feeds; the model has inputs {', '.join(infos)}.",
                     fix="Name .npy files after the input (e.g. calibration/<input>.npy), use .npz keyed by input "
                         "name, or set calibration.input.")


def calibration_files(folder: Optional[Path], cal: Calibration) -> List[Path]:
    """The calibration folder's data files; empty only where ``cal.synthetic`` allows no data.

    Raises:
        ModelError: no data files and ``calibration.synthetic`` false, naming the folder.
    """
    files = _data_files(Path(folder)) if folder is not None and Path(folder).is_dir() else []
    if not files and not cal.synthetic:
        where = f"{folder}" if folder is not None else f"the package's {cal.data}/ folder"
        raise ModelError(f"INT8 needs calibration data, and {where} has no .npy, .npz, .jpg or .png files.",
                         fix=NO_DATA_FIX)
    return files


def _data_files(folder: Path) -> List[Path]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in ARRAY_SUFFIXES + IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _npy_samples(raw: bytes, source: str, spec: ModelSpec, infos: Dict[str, InputInfo],
                 stem: str) -> Dict[str, np.ndarray]:
    array = load_npy(raw, source)
    info = _resolve_single_input(spec, infos, source, stem)
    return {info.name: _conform(info, array, source)}


def _npz_samples(raw: bytes, source: str, infos: Dict[str, InputInfo]) -> Dict[str, np.ndarray]:
    arrays = load_npz(raw, source)  # refuses pickles and members that inflate past limits.max_array_mib
    unknown = sorted(set(arrays) - set(infos))
    if unknown:
        raise ModelError(f"{source} has arrays {', '.join(unknown)}, which the model has no inputs called.",
                         fix=f"Key the arrays by the model's input names: {', '.join(infos)}.")
    missing = sorted(set(infos) - set(arrays))
    if missing:
        raise ModelError(f"{source} lacks arrays for input(s) {', '.join(missing)}.",
                         fix="Every .npz file must hold one array per model input, with equal sample counts.")
    conformed = {k: _conform(infos[k], v, source) for k, v in arrays.items()}
    sizes = {k: v.shape[0] for k, v in conformed.items()}
    if len(set(sizes.values())) != 1:
        raise ModelError(f"{source} has different sample counts per input: {sizes}.",
                         fix="Give every input the same number of samples in each file.")
    return conformed


def _image_samples(raw: bytes, source: str, spec: ModelSpec, infos: Dict[str, InputInfo],
                   opt: Dict[str, List[int]], geometry: List[Any]) -> Dict[str, np.ndarray]:
    """One preprocessed image as a batch of one; ``geometry`` caches (size, channels) across images."""
    cal = spec.calibration
    info = _resolve_single_input(spec, infos, source, None) if (cal.input or len(infos) == 1) else None
    if info is None:
        raise ModelError(f"{source} is an image, but the model has several inputs ({', '.join(infos)}) and "
                         f"calibration.input does not say which one images feed.",
                         fix="Set calibration.input to the image input; other inputs need .npz files.")
    if not geometry:
        geometry.append(_image_geometry(info, cal.preprocess, opt.get(info.name)))
    size, channels = geometry[0]
    try:
        sample = preprocess_image(io.BytesIO(raw), cal.preprocess, size=size, channels=channels)
    except ModelError:
        raise
    except Exception as err:  # Pillow raises several types for unreadable images
        raise ModelError(f"{source} cannot be read as an image: {err}",
                         fix="Replace or remove the file.") from None
    return {info.name: _conform(info, sample[None], source + " (after calibration.preprocess)")}


def _joined_samples(parts: Dict[str, List[np.ndarray]], limit: int) -> Dict[str, np.ndarray]:
    """Each input's samples in one array (at most ``limit``); every input the same count."""
    missing = [n for n, p in parts.items() if sum(a.shape[0] for a in p) == 0]
    if missing:
        raise ModelError(f"the calibration data has no samples for input(s) {', '.join(missing)}.",
                         fix="Add .npy files named after those inputs or .npz files holding every input.")
    arrays: Dict[str, np.ndarray] = {}
    for name, pieces in parts.items():
        shapes = {tuple(p.shape[1:]) for p in pieces}
        if len(shapes) > 1:
            raise ModelError(f"calibration samples of input {name!r} have different shapes: "
                             f"{sorted(list(s) for s in shapes)}.",
                             fix="Give all samples of an input one shape (the calibration profile's opt shape).")
        arrays[name] = np.concatenate(pieces, axis=0)[:limit]
    sizes = {k: int(v.shape[0]) for k, v in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise ModelError(f"the calibration data has different sample counts per input: {sizes}.",
                         fix="Give every input the same number of samples.")
    return arrays


def load_calibration_data(folder: Optional[Path], spec: ModelSpec, inputs: Iterable[Any],
                          profiles: Optional[Sequence[Mapping[str, Any]]] = None) -> CalibrationData:
    """Calibration samples for every input of the model, from ``folder`` (or synthetic when allowed).

    Args:
        folder: the package's calibration folder; None or an empty/missing folder means no data.
        spec: the model's spec (``calibration`` section).
        inputs: the model's inputs: IOInfo-like objects or dicts with name, dtype (or ONNX elem_type), shape.
        profiles: resolved optimisation profiles (input name -> {"min","opt","max"}); the first one is the
            calibration profile. Used for synthetic shapes and for image inputs with dynamic height/width.

    Raises:
        ModelError: no data and ``calibration.synthetic`` false; a file feeding an unknown input; shapes,
            dtypes or sample counts that do not fit the model.
    """
    infos = {i.name: i for i in (as_input_info(x) for x in inputs)}
    if not infos:
        raise ModelError("the model has no inputs to calibrate.", fix="Check the model's graph inputs.")
    cal = spec.calibration
    files = calibration_files(folder, cal)
    if not files:
        return synthetic_calibration_data(spec, infos.values(), profiles)

    opt = _opt_shapes(spec, profiles)
    limit = cal.max_samples
    parts: Dict[str, List[np.ndarray]] = {name: [] for name in infos}
    counts = {name: 0 for name in infos}
    digest = hashlib.sha256()
    used: List[str] = []
    used_images = False
    geometry: List[Any] = []  # the image size/channels, worked out once from the first image

    for path in files:
        if all(counts[n] >= limit for n in infos):
            break  # enough samples: later files are neither read nor hashed
        rel = path.relative_to(folder).as_posix()
        raw = path.read_bytes()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(raw).digest())
        used.append(rel)
        suffix = path.suffix.lower()
        source = f"calibration file {rel}"
        if suffix == ".npy":
            got = _npy_samples(raw, source, spec, infos, path.stem)
        elif suffix == ".npz":
            got = _npz_samples(raw, source, infos)
        else:
            got = _image_samples(raw, source, spec, infos, opt, geometry)
            used_images = True
        for name, array in got.items():
            parts[name].append(array)
            counts[name] += array.shape[0]

    arrays = _joined_samples(parts, limit)

    recipe = {"version": _RECIPE_VERSION, "max_samples": limit, "input": cal.input,
              "preprocess": cal.preprocess.model_dump(mode="json") if used_images else None,
              "inputs": {k: [v.dtype.name, list(v.shape)] for k, v in arrays.items()}}
    digest.update(json.dumps(recipe, sort_keys=True).encode())
    data = CalibrationData(arrays, digest.hexdigest(), synthetic=False, sources=used)
    log.info("calibration data: %d samples from %d files (sha %s)", data.samples, len(used), data.sha256[:12])
    return data


def synthetic_calibration_data(spec: ModelSpec, inputs: Iterable[Any],
                               profiles: Optional[Sequence[Mapping[str, Any]]] = None) -> CalibrationData:
    """Seeded random samples at the calibration profile's opt shape (``calibration.synthetic: true``).

    The one synthetic rule of tasks/shapes.py, integers 0 or 1 (valid indices for any embedding).
    Four opt-shape batches are made (at most ``max_samples`` samples).
    """
    infos = [as_input_info(x) for x in inputs]
    opt = _opt_shapes(spec, profiles)
    shapes: Dict[str, List[int]] = {}
    for info in infos:
        if info.name in opt:
            shape = list(opt[info.name])
        else:
            shape = []
            for axis, d in enumerate(info.shape):
                if _static(d):
                    shape.append(int(d))
                elif axis == 0:
                    shape.append(default_batch_range(spec.build.default_opt_batch, spec.build.default_max_batch)[1])
                else:
                    raise ModelError(f"synthetic calibration needs a shape for input {info.name!r}, whose dim {axis} "
                                     f"is dynamic ({d!r}).",
                                     fix=f"Add an optimisation profile for {info.name!r} to trtflow.yaml.")
        shapes[info.name] = shape
    batch = max((s[0] for s in shapes.values() if s), default=1)
    n = max(1, min(spec.calibration.max_samples, 4 * batch))
    # integers 0 or 1 (int_high 2): valid indices for any embedding table
    arrays = synthetic_inputs({i.name: i.dtype for i in infos}, {i.name: [n, *shapes[i.name][1:]] for i in infos},
                              seed=SYNTHETIC_SEED, int_highs={i.name: 2 for i in infos})
    recipe = {"version": _RECIPE_VERSION, "synthetic": True, "seed": SYNTHETIC_SEED, "rule": SYNTHETIC_RULE,
              "inputs": {k: [v.dtype.name, list(v.shape)] for k, v in arrays.items()}}
    sha = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    log.warning("INT8 calibration uses synthetic data: %s", SYNTHETIC_NOTE)
    return CalibrationData(arrays, sha, synthetic=True, note=SYNTHETIC_NOTE)


# ---- batches for the GPU calibrator --------------------------------------------------------------
def calibration_batch_size(spec: ModelSpec, profiles: Optional[Sequence[Mapping[str, Any]]] = None) -> int:
    """The batch size of implicit-calibration batches: the calibration profile's opt batch.

    ``calibration.batch_size`` must equal it when the spec sets it; when left at its default the
    profile's opt batch wins.

    Raises:
        ModelError: the spec sets a batch size other than the calibration profile's opt batch, or the
            profile's inputs disagree on their opt batch.
    """
    opt = _opt_shapes(spec, profiles)
    batches = {name: shape[0] for name, shape in opt.items() if shape}
    if not batches:
        return spec.calibration.batch_size
    if len(set(batches.values())) != 1:
        raise ModelError(f"the calibration profile's inputs have different opt batch sizes: {batches}.",
                         fix="Give every input of the first profile the same opt batch (dim 0).")
    opt_batch = next(iter(batches.values()))
    if "batch_size" in spec.calibration.model_fields_set and spec.calibration.batch_size != opt_batch:
        raise ModelError(f"calibration.batch_size is {spec.calibration.batch_size}, but the calibration profile's opt "
                         f"batch is {opt_batch}; TensorRT's calibrator reads batches of the opt shape.",
                         fix=f"Set calibration.batch_size: {opt_batch} (or drop it), or change the first profile's opt batch.")
    return opt_batch


def _batch_indices(total: int, batch_size: int, pad: bool) -> List[np.ndarray]:
    """Sample indices per batch. With ``pad`` the last batch is filled up by wrapping round to the first
    samples; without, it is shorter."""
    out = []
    count = max(1, -(-total // batch_size))
    for b in range(count):
        idx = np.arange(b * batch_size, (b + 1) * batch_size)
        if pad:
            idx = idx % total
        else:
            idx = idx[idx < total]
        out.append(idx)
    return out


def calibration_batches(data: CalibrationData, batch_size: int, out_dir: Path,
                        profiles: Optional[Sequence[Mapping[str, Any]]] = None) -> List[Path]:
    """Write the data as ``batch-00000.npz``... files, each keyed by input name with exactly
    ``batch_size`` samples: what tasks/gpu's calibrator feeds TensorRT, one file per ``get_batch``.

    The last batch is padded by wrapping round to the first samples rather than dropped: dropping would
    leave no batch at all when there are fewer samples than one batch, and padding with real samples
    (not zeros) leaves the activation ranges and histograms as the real data makes them. Every sample
    is used at least once; at most ``batch_size - 1`` are used twice.

    Args:
        profiles: resolved profiles; when given, every batch must have the calibration profile's opt
            shape, since TensorRT's calibrator reads exactly that many bytes per input (a smaller batch
            makes it read past the buffer: an illegal memory access, measured on TensorRT 8.6).

    Raises:
        ModelError: batch size or sample shapes differ from the calibration profile's opt shape.
    """
    if batch_size < 1:
        raise ModelError(f"calibration batch size {batch_size} is not positive.", fix="Use a batch size >= 1.")
    opt = _opt_shapes(None, profiles)
    for name, arr in data.arrays.items():
        if name not in opt:
            continue
        want = list(opt[name])
        got = [batch_size, *arr.shape[1:]]
        if got != want:
            raise ModelError(f"calibration batches of input {name!r} would be {got}, but the calibration profile's "
                             f"opt shape is {want}; TensorRT's calibrator needs batches of exactly the opt shape.",
                             fix=f"Set calibration.batch_size: {want[0]} and give samples of shape {want[1:]} "
                                 f"(or change the first profile's opt shape).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("batch-*.npz"):
        stale.unlink()
    paths = []
    for number, idx in enumerate(_batch_indices(data.samples, batch_size, pad=True)):
        path = out / f"batch-{number:05d}.npz"
        np.savez(path, **data.take(idx))
        paths.append(path)
    log.info("wrote %d calibration batches of %d samples to %s", len(paths), batch_size, out)
    return paths


# ---- onnxruntime.quantization -------------------------------------------------------------------
def _reader_base():
    from onnxruntime.quantization import CalibrationDataReader

    return CalibrationDataReader


class CalibrationReader(_reader_base()):  # type: ignore[misc]
    """An ``onnxruntime.quantization.CalibrationDataReader`` over :class:`CalibrationData`.

    Yields ``{input name: batch}``. ``pad=True`` fills the last batch up (needed when the model's batch
    dim is static); ``set_range`` and ``len`` are in batches, so ``quantize_static``'s
    ``CalibStridedMinMax`` can collect in chunks and bound memory.
    """

    def __init__(self, data: CalibrationData, batch_size: int = 16, pad: bool = False):
        self.data = data
        self.batch_size = max(1, int(batch_size))
        self._batches = _batch_indices(data.samples, self.batch_size, pad)
        self._start, self._end = 0, len(self._batches)
        self._pos = 0

    def __len__(self) -> int:
        return len(self._batches)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        if self._start + self._pos >= self._end:
            return None
        batch = self.data.take(self._batches[self._start + self._pos])
        self._pos += 1
        return batch

    def rewind(self) -> None:
        self._pos = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start, self._end = max(0, start_index), min(len(self._batches), end_index)
        self._pos = 0
