"""CPU threads for the ONNX Runtime sessions of heavy CPU stages (reference outputs, the ORT CPU
benchmark, calibration).

ONNX Runtime sizes its intra-op pool to every core and lets idle threads spin. Alone that is its
fastest; but when several conversions share a machine (a CPU worker with several slots, the zoo's
parallel jobs) each of N stages runs a spinning thread per core on the same cores (on the H200 host,
16 cores, 8 zoo conversions with the defaults: no INT8 conversion finished in 7 minutes; with 4
threads each, ResNet-50's INT8 completed, its Q/DQ build in 37.8 s). ``TRTFLOW_CPU_THREADS=<n>`` gives every session
trtflow opens ``n`` threads that sleep when idle; unset (or 0), ONNX Runtime's defaults stand.

Python 3.9-clean and free of Prefect: runs in the heavy stages' child interpreters.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

ENV = "TRTFLOW_CPU_THREADS"


def cpu_threads(environ: Optional[dict] = None) -> int:
    """The configured thread count, 0 for ONNX Runtime's default; a bad value is a clear error."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not raw:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r} is not a whole number; set it to the threads one conversion's "
                         f"CPU stage may use (e.g. cores / conversions at once), or unset it.") from None
    if value < 0:
        raise ValueError(f"{ENV}={value} is negative; use 0 or unset it for ONNX Runtime's default.")
    return value


def session_options(threads: Optional[int] = None) -> Any:
    """``onnxruntime.SessionOptions`` with ``threads`` (default: :func:`cpu_threads`) and no spinning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    threads = cpu_threads() if threads is None else threads
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        # a spinning idle thread burns the core another conversion's stage is waiting for
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


@contextlib.contextmanager
def calibration_sessions(threads: Optional[int] = None) -> Iterator[int]:
    """Within the block, onnxruntime.quantization's calibrators open their session with
    :func:`session_options`.

    ``quantize_static`` offers no session options: its calibrator builds the session itself
    (``CalibraterBase.create_inference_session``, the same body since onnxruntime 1.10). This
    replaces that one method for the block with the same body plus the thread settings; the heavy
    stage runs in its own interpreter, so nothing else sees the change.
    """
    threads = cpu_threads() if threads is None else threads
    if not threads:
        yield 0
        return
    import onnxruntime as ort
    from onnxruntime.quantization import calibrate

    original = calibrate.CalibraterBase.create_inference_session

    def create_inference_session(self):  # noqa: ANN001 - onnxruntime's signature
        opts = session_options(threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as onnxruntime's body
        self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                  providers=self.execution_providers)

    calibrate.CalibraterBase.create_inference_session = create_inference_session
    try:
        yield threads
    finally:
        calibrate.CalibraterBase.create_inference_session = original
