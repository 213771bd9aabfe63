"""Tensor shapes shared by the CPU side and the GPU interpreter: one description of a model's I/O.

``TensorInfo`` is the one type for a graph input or output (validation, calibration, eval inputs
and the GPU side all use it); ``model_io`` reads it from an already-loaded ``ModelProto`` so each
stage parses the ONNX file once and passes the proto (or the ``ModelIO``) along. The dtype map,
the default batch range of a dynamic dim 0 and the synthetic-input rule live here too.

Python 3.9-compatible; imports only the standard library, numpy and onnx (tasks/gpu imports it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

Dim = Union[int, str, None]  # static size, symbolic name (dim_param), or unknown
ShapeRange = Dict[str, List[int]]  # {"min": [...], "opt": [...], "max": [...]}
ResolvedProfile = Dict[str, ShapeRange]  # input name -> range, every input (static: min = opt = max)
RANGE_KEYS = ("min", "opt", "max")


@dataclass
class TensorInfo:
    """A graph input or output. ``dtype`` is a numpy name ("float32") where numpy has the type,
    else the ONNX name ("bfloat16", "string"). ``shape`` is None when the model declares no rank."""

    name: str
    dtype: str
    shape: Optional[List[Dim]]
    dynamic_dims: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Built positionally (name, dtype, shape) the dynamic dims follow from the shape; a tuple
        # shape becomes a list so that the same input compares equal however it was described.
        if self.shape is not None:
            self.shape = list(self.shape)
            if not self.dynamic_dims:
                self.dynamic_dims = [i for i, d in enumerate(self.shape) if not isinstance(d, int) or d < 0]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_any(cls, item: Any) -> "TensorInfo":
        """From a TensorInfo, a dict or an object with name, dtype (or elem_type) and shape."""
        if isinstance(item, cls):
            return item
        get = item.get if isinstance(item, Mapping) else (lambda k, d=None: getattr(item, k, d))
        dtype = get("dtype")
        if dtype is None:
            dtype = get("elem_type")
        if dtype is None:
            raise ValueError(f"input description {item!r} has no dtype; give dtype (e.g. 'float32') or elem_type")
        raw = get("shape")
        shape = None if raw is None else [int(d) if isinstance(d, (int, np.integer)) else d for d in raw]
        return cls(str(get("name")), numpy_dtype(dtype).name, shape)

    def shape_text(self) -> str:
        if self.shape is None:
            return "?"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"

    def np_dtype(self) -> np.dtype:
        return numpy_dtype(self.dtype)


@dataclass
class ModelIO:
    """A model's graph inputs (initializers listed as inputs by old exporters left out) and outputs."""

    inputs: List[TensorInfo] = field(default_factory=list)
    outputs: List[TensorInfo] = field(default_factory=list)

    def input(self, name: str) -> Optional[TensorInfo]:
        return next((t for t in self.inputs if t.name == name), None)


# ---- dtypes -------------------------------------------------------------------------------------
_ONNX_NAMES = {"FLOAT": "float32", "FLOAT16": "float16", "DOUBLE": "float64", "INT8": "int8", "UINT8": "uint8",
               "INT16": "int16", "INT32": "int32", "INT64": "int64", "BOOL": "bool", "HALF": "float16"}


def numpy_dtype(value: Any) -> np.dtype:
    """numpy dtype of a numpy dtype, "float32", "tensor(float)", "FLOAT" or an ONNX elem type (int)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        from onnx import helper

        return np.dtype(helper.tensor_dtype_to_np_dtype(int(value)))
    if isinstance(value, np.dtype):
        return value
    text = str(value)
    if text.startswith("tensor(") and text.endswith(")"):
        text = {"float": "float32", "double": "float64"}.get(text[7:-1], text[7:-1])
    return np.dtype(_ONNX_NAMES.get(text.upper(), text))


def dtype_name(elem_type: int) -> str:
    """An ONNX elem type's name: numpy's where numpy has it, else ONNX's lower-cased ("bfloat16")."""
    from onnx import TensorProto, helper

    if elem_type == TensorProto.STRING:
        return "string"
    if elem_type == TensorProto.UNDEFINED:
        return "undefined"
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return helper.tensor_dtype_to_string(elem_type).replace("TensorProto.", "").lower()


# ---- reading a model ----------------------------------------------------------------------------
def tensor_info(vi: Any) -> Tuple[TensorInfo, Optional[str]]:
    """(info, problem) of an ONNX ValueInfoProto: problem is set when it is not a tensor."""
    kind = vi.type.WhichOneof("value")
    if kind != "tensor_type":
        return TensorInfo(vi.name, kind or "undefined", None, []), f"is a {kind or 'typeless'} value, not a tensor"
    tt = vi.type.tensor_type
    dtype = dtype_name(tt.elem_type)
    if not tt.HasField("shape"):
        return TensorInfo(vi.name, dtype, None, []), None
    shape: List[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value >= 0:
            shape.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            shape.append(d.dim_param)
        else:
            shape.append(None)
    dynamic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
    return TensorInfo(vi.name, dtype, shape, dynamic), None


def model_io(model: Any) -> ModelIO:
    """The I/O of an already-loaded ``onnx.ModelProto`` (or a path, loaded without external data)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    inits = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    return ModelIO(inputs=[tensor_info(vi)[0] for vi in model.graph.input if vi.name not in inits],
                   outputs=[tensor_info(vi)[0] for vi in model.graph.output])


# ---- profiles -----------------------------------------------------------------------------------
def default_batch_range(default_opt_batch: int, default_max_batch: int) -> Tuple[int, int, int]:
    """(min, opt, max) of a dynamic batch (dim 0) no profile names: 1, opt capped at max, max."""
    hi = max(1, int(default_max_batch))
    return 1, max(1, min(int(default_opt_batch), hi)), hi


def shape_range(rng: Any) -> ShapeRange:
    """{"min", "opt", "max"} lists of ints from a dict or an object with min/opt/max."""
    if isinstance(rng, Mapping):
        return {k: [int(x) for x in rng[k]] for k in RANGE_KEYS}
    return {k: [int(x) for x in getattr(rng, k)] for k in RANGE_KEYS}


def opt_shapes(profile: Optional[Mapping[str, Any]]) -> Dict[str, List[int]]:
    """Every input's shape at a resolved profile's opt point."""
    return {name: [int(x) for x in r["opt"]] for name, r in (profile or {}).items()}


# ---- synthetic inputs ---------------------------------------------------------------------------
SYNTHETIC_RULE = "normal-floats/uint8-bytes/small-ints/random-bools:v1"  # in cache recipes: bump when the rule changes
SYNTHETIC_INT_HIGH = 10  # synthetic integers are drawn from [0, 10): valid ids for any table of >= 10 rows


def synthetic_array(shape: Sequence[int], dtype: Any, rng: np.random.Generator,
                    int_high: int = SYNTHETIC_INT_HIGH) -> np.ndarray:
    """One synthetic tensor: standard-normal floats, uint8 over 0..255 (image bytes), small
    non-negative integers (valid as ids, lengths, indices and class labels), random bools.

    Raises:
        TypeError: a dtype with no synthetic rule (strings, complex); callers name the input and fix.
    """
    dtype = np.dtype(dtype)
    shape = [int(d) for d in shape]
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.uint8:
        return rng.integers(0, 256, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, max(1, int(int_high)), size=shape).astype(dtype)
    raise TypeError(f"no synthetic data rule for dtype {dtype}")


def synthetic_inputs(dtypes: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], seed: int = 0,
                     int_highs: Optional[Mapping[str, int]] = None) -> Dict[str, np.ndarray]:
    """One synthetic tensor per input (see ``synthetic_array``), seeded: the same seed, the same data."""
    rng = np.random.default_rng(seed)
    highs = dict(int_highs or {})
    return {name: synthetic_array(shape, dtypes[name], rng, highs.get(name, SYNTHETIC_INT_HIGH))
            for name, shape in shapes.items()}
