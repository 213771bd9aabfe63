"""The one retry predicate: ModelErrors are never retried, InfraErrors and surprises are."""
from __future__ import annotations

import pytest
from prefect.states import Completed, Failed

from tasks.errors import InfraError, ModelError, retry_condition


@pytest.mark.parametrize("exc, retried", [
    (ModelError("bad opset", fix="re-export"), False),
    (InfraError("bucket unreachable"), True),
    (InfraError("no TensorRT on this worker", retriable=False), False),
    (RuntimeError("surprise"), True),
])
def test_retry_condition_on_real_prefect_states(exc, retried):
    assert retry_condition(None, None, Failed(data=exc)) is retried


def test_a_state_without_an_exception_is_retried():
    assert retry_condition(None, None, Completed(data=1)) is True
