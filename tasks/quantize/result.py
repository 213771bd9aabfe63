"""The record of one Q/DQ model and the recipe that keys its cache."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

from tasks.spec import ModelSpec
from tasks.quantize.graph import PLACEMENT
from tasks.quantize.backends import choose_backend

@dataclass
class QuantizeResult:
    """What ``qdq_model_from_calibration`` made (a small JSON-able record; the model is at ``out_path``)."""

    out_path: str
    method: str
    backend: str
    placement: str
    qdq_nodes: Dict[str, int]
    quantized_nodes: List[str]
    excluded_nodes: List[str]
    residual_adds: List[str]
    data_sha256: str
    synthetic: bool = False
    note: Optional[str] = None
    stats_path: Optional[str] = None
    seconds: float = 0.0
    recipe: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizeResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def stats_path_for(model_path: Union[str, Path]) -> Path:
    """Where the calibration statistics of a Q/DQ model lie: ``<model>.stats.json`` beside it."""
    p = Path(model_path)
    return p.with_name(p.name + ".stats.json")


def quantize_recipe(spec: ModelSpec, tensorrt: Optional[str] = None) -> str:
    """Hash of everything besides model and data that changes the Q/DQ model (part of its cache key),
    the backend as :func:`choose_backend` resolves it here (``auto`` differs between workers)."""
    c = spec.calibration
    relevant = {"placement": PLACEMENT, "method": c.method, "backend": choose_backend(spec, tensorrt),
                "exclude_nodes": sorted(c.exclude_nodes),
                "exclude_op_types": sorted(c.exclude_op_types),
                "percentile": c.percentile if c.method == "percentile" else None}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]
