"""Implicit INT8 calibration: an ``IInt8EntropyCalibrator2`` fed from .npz batches (pycuda or cuda-python).

TensorRT <= 10 only (removed in 11; compat.plan_build refuses it there). Each batch file holds one
array per network input, keyed by input name, whose shape must equal the calibration profile's opt
shape: TensorRT calibrates at that shape and copies that many bytes from the pointer we hand it, so
a smaller batch makes it read past the buffer (measured on an H100: an illegal memory access).
``check_calibration_batches`` therefore reads every file's array headers before the build.

The calibration cache (``cache_in``) is handed to TensorRT when it exists, which then skips
calibration; the cache TensorRT writes goes to ``cache_out``.

Python 3.9-compatible; tensorrt and pycuda are imported inside ``make_calibrator`` only.
"""
from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from tasks.errors import InfraError, ModelError, TrtflowError

log = logging.getLogger("trtflow.gpu.calibrator")


def npz_headers(path: str) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array in an .npz, read from the headers only (no data loaded)."""
    out: Dict[str, Tuple[Tuple[int, ...], np.dtype]] = {}
    with zipfile.ZipFile(path) as zf:
        for member in zf.namelist():
            if not member.endswith(".npy"):
                continue
            with zf.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            out[member[:-len(".npy")]] = (tuple(int(d) for d in shape), np.dtype(dtype))
    return out


def check_calibration_batches(paths: List[str], opt_shapes: Dict[str, List[int]]) -> None:
    """Every batch file must hold every input at exactly the calibration profile's opt shape.

    Raises:
        ModelError: no batches, a file that is not an .npz, a missing input, a wrong shape.
    """
    if not paths:
        raise ModelError("INT8 calibrator mode needs calibration batches, and the request has none.",
                         fix="Put calibration data (calibration/*.npz or images) in the model package, or set "
                             "calibration.synthetic: true.")
    fix = (f"Make each calibration batch exactly the calibration profile's opt shape "
           f"({', '.join(f'{k}: {v}' for k, v in opt_shapes.items())}): set calibration.batch_size to the profile's opt "
           f"batch, or change the first profile's opt.")
    for path in paths:
        try:
            headers = npz_headers(path)
        except (OSError, zipfile.BadZipFile, ValueError) as err:
            raise ModelError(f"calibration batch {path} is not a readable .npz file ({err}).",
                             fix="Write calibration batches with numpy.savez, one array per input name.") from None
        for name, opt in opt_shapes.items():
            if name not in headers:
                raise ModelError(f"calibration batch {Path(path).name} has no array for input {name!r} "
                                 f"(it has {', '.join(sorted(headers)) or 'none'}).",
                                 fix="Key each calibration array by the model's input name.")
            shape = headers[name][0]
            if list(shape) != [int(d) for d in opt]:
                raise ModelError(f"calibration batch {Path(path).name} gives input {name!r} shape {list(shape)}, but "
                                 f"the calibration profile's opt shape is {list(opt)}; TensorRT would read past the "
                                 f"batch's buffer.", fix=fix)


class CalibrationFeed:
    """What the calibrator does, apart from TensorRT's base class: feeds .npz batches into device
    buffers, reads and writes the cache, and keeps the first error (an exception must not cross
    into TensorRT's C++). ``cuda`` is tasks/gpu/cuda_backend's interface (or a test double of it)."""

    def __init__(self, cuda: Any, calibration: Dict[str, Any], opt_shapes: Dict[str, List[int]],
                 input_dtypes: Dict[str, Any]) -> None:
        self.cuda = cuda
        self.batches = [str(b) for b in calibration.get("batches") or []]
        self.cache_in = calibration.get("cache_in")
        self.cache_out = calibration.get("cache_out")
        self.has_cache = (bool(self.cache_in) and Path(str(self.cache_in)).is_file()
                          and Path(str(self.cache_in)).stat().st_size > 0)
        self.input_dtypes = input_dtypes
        self.error: Optional[TrtflowError] = None
        self.batches_used = 0
        self.cache_read = False
        self.cache_written = 0
        self._next = 0
        self._buffers: Dict[str, Any] = {}
        for name, shape in opt_shapes.items():
            nbytes = int(np.prod(shape)) * np.dtype(input_dtypes[name]).itemsize
            self._buffers[name] = cuda.mem_alloc(max(nbytes, 1))

    def next_batch(self, names: List[str]) -> Optional[List[int]]:
        if self.error is not None or self._next >= len(self.batches):
            return None
        path = self.batches[self._next]
        self._next += 1
        try:
            with np.load(path, allow_pickle=False) as data:
                pointers = []
                for name in names:
                    array = np.ascontiguousarray(data[name].astype(self.input_dtypes[name], copy=False))
                    self.cuda.memcpy_htod(self._buffers[name], array)
                    pointers.append(int(self._buffers[name]))
        except Exception as err:  # noqa: BLE001 - an exception must not cross into TensorRT's C++
            self.error = _as_error(err, path)
            log.error("calibration batch %s failed: %s", path, err)
            return None
        self.batches_used += 1
        log.info("calibration batch %d/%d", self.batches_used, len(self.batches))
        return pointers

    def read_cache(self) -> Optional[bytes]:
        if not self.has_cache:
            return None
        self.cache_read = True
        log.info("using calibration cache %s (calibration skipped)", self.cache_in)
        return Path(str(self.cache_in)).read_bytes()

    def write_cache(self, cache: Any) -> None:
        if not self.cache_out:
            return
        try:
            data = bytes(memoryview(cache))
            Path(str(self.cache_out)).parent.mkdir(parents=True, exist_ok=True)
            Path(str(self.cache_out)).write_bytes(data)
            self.cache_written = len(data)
        except Exception as err:  # noqa: BLE001 - see next_batch
            self.error = InfraError(f"cannot write the calibration cache {self.cache_out}: {err}",
                                    fix="Check the worker's disk space and permissions; retry.")

    def summary(self) -> Dict[str, Any]:
        cache_in, cache_out = self.cache_in, self.cache_out
        reused = self.cache_read and self.batches_used == 0
        if reused and cache_out and str(cache_out) != str(cache_in) and not self.cache_written:
            # TensorRT does not write a cache it just read; keep cache_out the cache in use.
            shutil.copyfile(str(cache_in), str(cache_out))
        size = Path(str(cache_out)).stat().st_size if cache_out and Path(str(cache_out)).is_file() else 0
        return {"cache_bytes": int(size), "reused": bool(reused), "batches": self.batches_used,
                "cache_out": str(cache_out) if cache_out else None}


def make_calibrator(trt: Any, calibration: Dict[str, Any], profile: Dict[str, Dict[str, List[int]]],
                    input_dtypes: Dict[str, Any]) -> Any:
    """An ``IInt8EntropyCalibrator2`` over ``calibration["batches"]`` at ``profile``'s opt shapes.

    Args:
        trt: the tensorrt module.
        calibration: the request's ``calibration`` ({"batches", "cache_in", "cache_out"}).
        profile: the calibration profile (input name -> {"min","opt","max"}).
        input_dtypes: numpy dtype of each network input (e.g. int32 where the ONNX input is int64).

    Returns:
        The calibrator; after the build, ``.error`` holds an exception raised inside a callback (to
        re-raise) and ``.summary()`` the response's ``calibration`` record.
    """
    from tasks.gpu.cuda_backend import cuda_api

    cuda = cuda_api()  # pycuda or cuda-python, as the runtime uses

    opt_shapes = {name: list(rng["opt"]) for name, rng in profile.items()}
    feed_args = (cuda, calibration, opt_shapes, input_dtypes)
    cache_in = calibration.get("cache_in")
    if not (cache_in and Path(str(cache_in)).is_file() and Path(str(cache_in)).stat().st_size > 0):
        check_calibration_batches([str(b) for b in calibration.get("batches") or []], opt_shapes)

    class _NpzEntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # without it the trampoline segfaults
            self.feed = CalibrationFeed(*feed_args)

        @property
        def error(self) -> Optional[TrtflowError]:
            return self.feed.error

        def get_batch_size(self) -> int:
            # Explicit-batch networks: the batch is part of the profile's opt shape, so TensorRT
            # wants 1 here (as Polygraphy's calibrator does).
            return 1

        def get_batch(self, names: List[str]) -> Optional[List[int]]:
            return self.feed.next_batch(names)

        def read_calibration_cache(self) -> Optional[bytes]:
            return self.feed.read_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            self.feed.write_cache(cache)

        def summary(self) -> Dict[str, Any]:
            return self.feed.summary()

    return _NpzEntropyCalibrator()


def _as_error(err: Exception, path: str) -> TrtflowError:
    if isinstance(err, TrtflowError):
        return err
    if isinstance(err, (KeyError, ValueError, TypeError)):
        return ModelError(f"calibration batch {path} cannot be fed to TensorRT: {err}",
                          fix="Write each calibration batch as an .npz with one array per input name at the "
                              "calibration profile's opt shape.")
    return InfraError(f"calibration batch {path} failed on the GPU: {type(err).__name__}: {err}",
                      fix="Retry; if it repeats, see build.log.")
