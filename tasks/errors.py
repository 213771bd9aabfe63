"""The one exception root of trtflow.

``ModelError``: the model or its spec is wrong. Never retried; recorded in a status file with a
message that says how to fix it. ``InfraError``: storage, worker, GPU out of memory, a crashed or
timed-out subprocess. Retried by Prefect with backoff.

Python 3.9-compatible and dependency-free: tasks/gpu raises these too.
"""
from __future__ import annotations


class TrtflowError(Exception):
    """Base of every error trtflow raises on purpose."""

    kind = "error"

    def __init__(self, message: str, *, fix: str | None = None, details: list | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.details = list(details or [])

    def __str__(self) -> str:
        text = self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        return text

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "fix": self.fix, "details": self.details}

    @classmethod
    def from_dict(cls, data: dict) -> "TrtflowError":
        kinds = {"model": ModelError, "infra": InfraError}
        klass = kinds.get(data.get("kind", ""), InfraError)
        return klass(data.get("message", "unknown error"), fix=data.get("fix"), details=data.get("details"))


class ModelError(TrtflowError):
    """The model or its spec is wrong; retrying cannot help."""

    kind = "model"


class InfraError(TrtflowError):
    """Storage, worker or GPU trouble; worth a retry."""

    kind = "infra"


def is_retriable(exc: BaseException) -> bool:
    """Prefect retry condition: everything except ModelError is worth a retry."""
    return not isinstance(exc, ModelError)
