"""Run an engine on the eval inputs and write its outputs; the flow compares them with ONNX Runtime
(tasks/accuracy.py), so there is one implementation of the metrics.

Eval inputs are one .npz whose keys are ``"<call>:<input name>"`` (call 0, 1, ...: one inference
each, full tensors the engine accepts); the outputs .npz has ``"<call>:<output name>"``.

Python 3.9-compatible.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from tasks.errors import ModelError

log = logging.getLogger("trtflow.gpu.check")


def group_calls(keys: List[str]) -> List[Tuple[str, Dict[str, str]]]:
    """``["0:images", "1:images"]`` -> ``[("0", {"images": "0:images"}), ("1", {...})]``, calls in
    numeric order. A key without a call prefix belongs to call "0"."""
    calls: Dict[str, Dict[str, str]] = {}
    for key in keys:
        call, sep, name = key.partition(":")
        if not sep:
            call, name = "0", key
        calls.setdefault(call, {})[name] = key

    def order(call: str) -> Tuple[int, str]:
        return (int(call), "") if call.isdigit() else (1 << 30, call)

    return [(c, calls[c]) for c in sorted(calls, key=order)]


def run_eval(runner: Any, inputs_path: str, outputs_path: str) -> Dict[str, Any]:
    """Run ``runner`` (an EngineRunner) once per call in ``inputs_path``; write ``outputs_path``.

    Returns:
        The response's ``eval`` record: {"outputs", "calls", "seconds"}.
    """
    if not Path(inputs_path).is_file():
        raise ModelError(f"eval inputs {inputs_path} do not exist.", fix="The flow writes them before the engine step; retry.")
    start = time.monotonic()
    outputs: Dict[str, np.ndarray] = {}
    with np.load(inputs_path, allow_pickle=False) as data:
        calls = group_calls(list(data.files))
        if not calls:
            raise ModelError(f"eval inputs {inputs_path} hold no arrays.", fix="Provide at least one eval sample.")
        for call, keys in calls:
            result = runner.run({name: data[key] for name, key in keys.items()})
            for name, array in result.items():
                outputs[f"{call}:{name}"] = array
            log.info("eval call %s: %s -> %s", call,
                     {n: list(data[k].shape) for n, k in keys.items()}, {n: list(a.shape) for n, a in result.items()})
    Path(outputs_path).parent.mkdir(parents=True, exist_ok=True)
    with open(outputs_path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(f, **outputs)
    return {"outputs": str(outputs_path), "calls": len(calls), "seconds": round(time.monotonic() - start, 4)}
