"""Secrets stay on the worker: the GPU child's environment allow-list and the one scrub function.

The GPU subprocess parses untrusted ONNX, so it gets only :func:`gpu_child_env` (no AWS_* or other
credentials). Any text that leaves for the bucket or Prefect (log tails, error messages copied into
status records, error.json, artifacts) goes through :func:`scrub` first.

Python 3.9-clean, no Prefect.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Mapping, Optional

REDACTED = "[REDACTED]"
_SECRET_WORDS = ("SECRET", "TOKEN", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE_KEY", "API_KEY", "SESSION",
                 "SIGNATURE")
# What the GPU child needs: a shell-ish basis, the CUDA/NVIDIA/TensorRT runtime, Python, trtflow's own knobs.
_ALLOWED_NAMES = {"PATH", "HOME", "LANG", "TMPDIR", "TEMP", "TMP", "LD_LIBRARY_PATH", "USER", "LOGNAME", "TZ"}
_ALLOWED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "TRT_", "PYTHON", "TRTFLOW_")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_SECRET_ASSIGNMENT = re.compile(r"(?i)\b([A-Z0-9_.-]*(?:" + "|".join(_SECRET_WORDS) + r")[A-Z0-9_.-]*)"
                                r"(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s&\"']+)")
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)([^/\s@]+)(@)")  # scheme://user:PASSWORD@host
_BEARER = re.compile(r"(?i)(\bbearer\s+)([A-Za-z0-9._~+/=-]{8,})")


def is_secret_name(name: str) -> bool:
    """An environment name that holds a credential: AWS_*, or SECRET/TOKEN/PASSWORD/... in it."""
    upper = name.upper()
    return upper.startswith("AWS_") or any(word in upper for word in _SECRET_WORDS)


def gpu_child_env(environ: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The allow-listed part of ``environ`` (default this process's), secrets dropped even if allowed."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items()
            if (k in _ALLOWED_NAMES or k.startswith(_ALLOWED_PREFIXES)) and not is_secret_name(k)}


def _secret_values(environ: Mapping[str, str]) -> list:
    # Longest first, so a value that contains another is replaced whole; short values would
    # redact ordinary words, so only values of 8+ characters count.
    return sorted({v for k, v in environ.items() if is_secret_name(k) and len(v) >= 8}, key=len, reverse=True)


def scrub(text: Any, environ: Optional[Mapping[str, str]] = None) -> Any:
    """``text`` with AWS key ids, ``SECRET=value``-style assignments (presigned URLs' signatures and
    tokens too), URL passwords, bearer tokens and the values of this process's credential variables
    replaced by ``[REDACTED]``. Lists and dicts are scrubbed member by member;
    other values are returned as they are."""
    if isinstance(text, dict):
        return {k: scrub(v, environ) for k, v in text.items()}
    if isinstance(text, (list, tuple)):
        return type(text)(scrub(v, environ) for v in text)
    if not isinstance(text, str):
        return text
    environ = os.environ if environ is None else environ
    for value in _secret_values(environ):
        text = text.replace(value, REDACTED)
    text = _AWS_KEY_ID.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(lambda m: m.group(1) + REDACTED + m.group(3), text)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return _SECRET_ASSIGNMENT.sub(lambda m: m.group(1) + m.group(2) + REDACTED, text)
