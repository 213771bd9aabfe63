"""Test doubles. Nothing here is product code; each double says what it stands in for."""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path


def make_trt_python_double(folder: Path, python: str = sys.executable) -> Path:
    """Write an executable that stands in for ``TRT_PYTHON`` and runs tests/doubles/gpu_double.py.

    gpu_client calls ``$TRT_PYTHON -m tasks.gpu <verb> req resp``; the double ignores ``-m tasks.gpu``
    and answers the same protocol with onnxruntime in place of TensorRT (see gpu_double.py).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "trt-python-double"
    root = Path(__file__).resolve().parents[2]
    script.write_text("#!/bin/sh\n# TEST DOUBLE for TRT_PYTHON: onnxruntime stands in for TensorRT.\n"
                      f"shift 2\nPYTHONPATH='{root}'${{PYTHONPATH:+:$PYTHONPATH}} exec '{python}' -m tests.doubles.gpu_double \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script
