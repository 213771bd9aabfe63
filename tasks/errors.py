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
    retriable = True

    def __init__(self, message: str, *, fix: str | None = None, details: list | None = None,
                 retriable: bool | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.details = list(details or [])
        if retriable is not None:
            self.retriable = retriable

    def __str__(self) -> str:
        text = self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        return text

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "fix": self.fix, "details": self.details,
                "retriable": self.retriable}

    @classmethod
    def from_dict(cls, data: dict) -> "TrtflowError":
        kinds = {"model": ModelError, "infra": InfraError}
        klass = kinds.get(data.get("kind", ""), InfraError)
        return klass(data.get("message", "unknown error"), fix=data.get("fix"), details=data.get("details"),
                     retriable=data.get("retriable"))


class ModelError(TrtflowError):
    """The model or its spec is wrong; retrying cannot help."""

    kind = "model"
    retriable = False


class InfraError(TrtflowError):
    """Storage, worker or GPU trouble; worth a retry unless ``retriable=False`` (a misconfigured
    worker, e.g. no TensorRT in TRT_PYTHON, stays misconfigured on a retry)."""

    kind = "infra"


def is_retriable(exc: BaseException) -> bool:
    """Prefect retry condition: InfraErrors and unexpected errors are worth a retry; ModelErrors never."""
    if isinstance(exc, TrtflowError):
        return exc.retriable
    return True


def retry_condition(task: object, task_run: object, state: object) -> bool:
    """The one retry predicate, in the shape of Prefect's ``retry_condition_fn``: retry what
    ``is_retriable`` says (InfraErrors, surprises), never a ModelError. Duck-typed on the state, so
    this module stays free of Prefect (the GPU interpreter imports it)."""
    try:
        exc = state.result(raise_on_failure=False)  # type: ignore[attr-defined]
    except Exception as err:  # noqa: BLE001 - the state may hold no retrievable result; judge what was raised
        exc = err
    return is_retriable(exc) if isinstance(exc, BaseException) else True
