"""ModelSpec: everything a conversion can be told, with every default in this one file.

A spec is read from an optional ``trtflow.yaml`` beside the model (``yaml.safe_load``, unknown keys
rejected with the key named) and can be overridden per run (CLI flags, Prefect UI form). ``None``
in an override means "keep the default".

Example ``trtflow.yaml``::

    precisions: [int8, fp16, fp32]       # preference order; the best passing engine becomes latest
    profiles:
      - images: {min: [1, 3, 224, 224], opt: [8, 3, 224, 224], max: [32, 3, 224, 224]}
    tolerances:
      int8: {min_cosine: 0.99, min_top1: 0.99}
    calibration:
      method: entropy
      preprocess: {resize: 256, crop: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
    build: {workspace_mib: 4096, optimization_level: 3}
    fp16: {keep_fp32_op_types: [Softmax], keep_fp32_nodes: [head/conv_out]}   # when FP16 fails its gate
"""
from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import ModelError

SPEC_FILENAME = "trtflow.yaml"
MAX_TENSOR_ELEMENTS = 2**31 - 1  # TensorRT's volume limit of one tensor


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"

    def __str__(self) -> str:
        # Defaults are members, parsed values plain strings (use_enum_values): both must print "int8".
        return self.value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True)


class ShapeRange(_Strict):
    """min/opt/max shape of one input within an optimisation profile."""

    min: List[int]
    opt: List[int]
    max: List[int]

    @model_validator(mode="after")
    def _ordered(self) -> "ShapeRange":
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise ValueError("min, opt and max must have the same rank")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not (1 <= lo <= mid <= hi):
                raise ValueError(f"need 1 <= min <= opt <= max in every dimension, got {self.min} / {self.opt} / {self.max}")
        volume = 1
        for d in self.max:
            volume *= d
        if volume > MAX_TENSOR_ELEMENTS:
            # TensorRT indexes tensors with 32-bit volumes; beyond that a shape only exhausts memory.
            raise ValueError(f"max shape {self.max} has {volume} elements, over TensorRT's limit of "
                             f"{MAX_TENSOR_ELEMENTS}; lower the batch (opt/max) or other dimensions")
        return self


Profile = Dict[str, ShapeRange]  # input name -> shape range


class Tolerance(_Strict):
    """Accuracy gate of one precision against the ONNX Runtime FP32 reference (None = not gated)."""

    min_cosine: Optional[float] = Field(None, ge=-1.0, le=1.0, description="lowest cosine similarity per output")
    max_abs: Optional[float] = Field(None, ge=0.0, description="largest absolute error per output")
    max_rel: Optional[float] = Field(None, ge=0.0, description="largest relative error per output")
    min_top1: Optional[float] = Field(None, ge=0.0, le=1.0, description="lowest top-1 agreement (logit outputs)")


DEFAULT_TOLERANCES: Dict[str, Tolerance] = {
    "fp32": Tolerance(min_cosine=0.9999),
    "fp16": Tolerance(min_cosine=0.999),
    "int8": Tolerance(min_cosine=0.99, min_top1=0.99),
}


class Preprocess(_Strict):
    """How calibration/eval images become input tensors."""

    resize: Optional[Union[int, List[int]]] = Field(None, description="shorter side, or [h, w]")
    crop: Optional[Union[int, List[int]]] = Field(None, description="centre crop, size or [h, w]")
    scale: float = Field(1.0 / 255.0, description="pixel values are multiplied by this first")
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    channel_order: Literal["rgb", "bgr"] = "rgb"
    layout: Literal["nchw", "nhwc"] = "nchw"
    dtype: Literal["float32", "float16", "uint8"] = "float32"


class Calibration(_Strict):
    """INT8 calibration. Data comes from the package's calibration/ folder (.npy/.npz keyed by input
    name, or images with ``preprocess``)."""

    data: str = Field("calibration", description="folder inside the model package")
    mode: Literal["qdq", "calibrator"] = Field(
        "qdq", description="qdq: explicit Q/DQ graph (all TensorRT versions); calibrator: implicit, TensorRT <= 10 only")
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = Field(99.999, gt=90.0, le=100.0)
    backend: Literal["auto", "onnxruntime", "modelopt"] = Field(
        "auto", description="auto: NVIDIA ModelOpt when installed, else onnxruntime.quantization")
    max_samples: int = Field(512, ge=1, le=100_000)
    batch_size: int = Field(8, ge=1, le=4096, description="calibrator batches; must equal the calibration profile's opt batch")
    synthetic: bool = Field(False, description="allow random calibration data (accuracy then not representative)")
    exclude_nodes: List[str] = Field(default_factory=list, description="ONNX node names kept in float")
    exclude_op_types: List[str] = Field(default_factory=list, description="ONNX op types kept in float")
    high_precision: Literal["auto", "fp16", "fp32"] = Field(
        "auto", description="float type of the Q/DQ graph's unquantised layers; auto: fp16 where the build is "
                            "strongly typed (TensorRT 10+), fp32 for 8.6 (its INT8+FP16 flags pick FP16)")
    input: Optional[str] = Field(None, description="input fed by images (default: the first input)")
    preprocess: Preprocess = Field(default_factory=Preprocess)


class Fp16(_Strict):
    """FP16 from the graph: an FP16 ONNX graph for strongly typed builds (TensorRT 11 has no FP16
    flag) and the FP16 part of INT8 Q/DQ graphs. Nodes that fail the FP16 gate can stay FP32."""

    source: Literal["auto", "graph", "flag"] = Field(
        "auto", description="auto: an FP16 graph where TensorRT has no FP16 flag (11); graph: always (as 11 "
                            "would, e.g. to compare); flag: TensorRT's FP16 flag (refused on 11)")
    converter: Literal["auto", "modelopt", "onnxruntime"] = Field(
        "auto", description="auto: NVIDIA ModelOpt AutoCast when installed, else onnxruntime's float16 converter")
    keep_fp32_op_types: List[str] = Field(default_factory=list, description="ONNX op types kept in FP32")
    keep_fp32_nodes: List[str] = Field(default_factory=list, description="ONNX node names kept in FP32")
    keep_io_types: bool = Field(True, description="keep the model's float inputs/outputs FP32 (callers feed the same arrays)")


class Eval(_Strict):
    """Inputs for the accuracy check. Without data, seeded synthetic inputs are used and flagged."""

    data: str = Field("eval", description="folder inside the model package")
    synthetic_samples: int = Field(8, ge=1, le=10_000)
    seed: int = 0
    max_samples: int = Field(256, ge=1, le=100_000)


class Build(_Strict):
    workspace_mib: int = Field(4096, ge=16, le=1 << 20)
    optimization_level: int = Field(3, ge=0, le=5)
    timeout_s: int = Field(1800, ge=10, le=86_400, description="kill the GPU subprocess after this long")
    hardware_compatibility: Literal["none", "ampere_plus"] = "none"
    version_compatible: bool = False
    timing_cache: bool = True
    default_max_batch: int = Field(32, ge=1, le=65_536, description="max of the default profile for a dynamic batch dim")
    default_opt_batch: int = Field(8, ge=1, le=65_536)


class Adapt(_Strict):
    """Rewrites before the build (tasks/adapt.py): IR lowering, opset conversion and dim renaming run
    whenever the target needs them; sanitise (constant folding) as chosen here."""

    sanitise: Literal["on-failure", "always", "never"] = Field(
        "on-failure", description="on-failure: fold constants only where the parser is known to reject the "
                                  "original (a Slice with computed inputs); always; never")


class Bench(_Strict):
    """How engines are timed (tasks/gpu/bench.py; docs/benchmarks.md explains the method)."""

    enabled: bool = True
    warmup: int = Field(20, ge=0, le=10_000, description="unused since warm-up is by time (warmup_ms); kept so old specs load")
    warmup_ms: float = Field(200.0, ge=0, le=600_000, description="warm-up by time before any figure is taken")
    window_ms: float = Field(1000.0, gt=0, le=600_000, description="total time of the enqueue-ahead throughput windows")
    windows: int = Field(5, ge=1, le=1000, description="throughput windows; their CoV is the stability figure")
    iterations: int = Field(200, ge=1, le=100_000, description="latency samples (GPU compute and host)")
    cuda_graph: bool = Field(True, description="capture the inference in a CUDA graph where the engine allows it")
    cov_limit: float = Field(0.05, gt=0, description="re-run the windows while their CoV is above this")
    max_reruns: int = Field(2, ge=0, le=100)
    layer_times: bool = Field(False, description="per-layer times (TensorRT IProfiler) into layer_times.json")
    sweep: Union[bool, List[int]] = Field(
        True, description="batch sweep: true = min, powers of two, opt, max of the profile; or a list of batches")
    p99_target_ms: Optional[float] = Field(None, gt=0, description="report the largest batch whose GPU p99 is within this")
    ort_iterations: int = Field(20, ge=1, le=10_000, description="ONNX Runtime CPU runs for the speedup figure")

    def gpu_request(self) -> Optional[dict]:
        """The GPU protocol's ``bench`` request (tasks/gpu/bench.py BenchSettings), None when disabled."""
        if not self.enabled:
            return None
        return self.model_dump(mode="json", exclude={"enabled", "warmup", "ort_iterations"})


class Limits(_Strict):
    """What one heavy CPU stage may use (tasks/limits.py): reference outputs, ORT benchmark,
    calibration and quantisation each run in a child under these; none change the engine."""

    cpu_stage_timeout_s: int = Field(1800, ge=1, le=86_400, description="wall clock per heavy CPU stage")
    cpu_memory_mib: int = Field(16384, ge=512, le=1 << 20, description="address-space limit per heavy CPU stage")
    max_array_mib: int = Field(4096, ge=1, le=1 << 20, description="largest array one .npy/.npz member may inflate to")


class ModelSpec(_Strict):
    """Everything a conversion can be told. Every default lives here."""

    precisions: List[Precision] = Field(
        default_factory=lambda: [Precision.INT8, Precision.FP16, Precision.FP32],
        description="preference order; see strategy")
    strategy: Literal["fallback", "all", "best"] = Field(
        "fallback", description="fallback: stop at the first precision that passes its gate; all: build every one; "
                                "best: build every one, publish those that pass, latest = the fastest passing one "
                                "(tasks/strategy.py)")
    adapt: Adapt = Field(default_factory=lambda: Adapt())
    profiles: List[Profile] = Field(default_factory=list, description="optimisation profiles, input name -> min/opt/max")
    tolerances: Dict[Precision, Tolerance] = Field(default_factory=dict, description="overrides of DEFAULT_TOLERANCES")
    calibration: Calibration = Field(default_factory=Calibration)
    fp16: Fp16 = Field(default_factory=Fp16)
    eval: Eval = Field(default_factory=Eval)
    build: Build = Field(default_factory=Build)
    bench: Bench = Field(default_factory=Bench)
    limits: Limits = Field(default_factory=Limits)

    @field_validator("precisions")
    @classmethod
    def _unique(cls, v: List[Precision]) -> List[Precision]:
        if not v:
            raise ValueError("name at least one precision (fp32, fp16, int8)")
        if len(set(v)) != len(v):
            raise ValueError("precisions must not repeat")
        return v

    def tolerance(self, precision: str) -> Tolerance:
        """The gate of ``precision``: the spec's override merged over the default."""
        base = DEFAULT_TOLERANCES[str(precision)].model_dump()
        override = self.tolerances.get(str(precision))
        if override is not None:
            base.update({k: v for k, v in override.model_dump().items() if v is not None})
        return Tolerance(**base)

    def build_key(self) -> str:
        """Hash of the spec (bench settings and limits aside): part of every engine address and the cache key."""
        relevant = self.model_dump(mode="json", exclude={"bench", "limits"})  # neither changes the engine
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        else:
            lines.append(f"{loc}: {e['msg']}")
    return f"{source} is not a valid trtflow spec: " + "; ".join(lines)


def _deep_merge(base: Dict[str, Any], over: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if value is None:
            continue  # None means default: never overwrite with it
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_spec(data: Optional[Dict[str, Any]], overrides: Optional[Dict[str, Any]] = None,
               source: str = SPEC_FILENAME) -> ModelSpec:
    """Build a ModelSpec from a mapping (plus overrides), raising ModelError with every bad key named."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ModelError(f"{source} must hold a mapping at the top level, got {type(data).__name__}.",
                         fix="Write keys such as `precisions:` and `profiles:` at the top of the file.")
    merged = _deep_merge(data, overrides or {})
    try:
        return ModelSpec(**merged)
    except ValidationError as err:
        raise ModelError(_format_validation_error(source, err),
                         fix=f"Correct or remove the named keys; the allowed keys and defaults are in tasks/spec.py "
                             f"and the README's 'Spec' section.") from None


def load_spec(path: Optional[Path], overrides: Optional[Dict[str, Any]] = None) -> ModelSpec:
    """Read ``trtflow.yaml`` (optional: None or a missing file gives the defaults)."""
    data: Any = {}
    source = SPEC_FILENAME
    if path is not None and Path(path).exists():
        source = str(Path(path).name)
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ModelError(f"{source} is not valid YAML: {err}", fix="Fix the YAML syntax at the position named.") from None
    return parse_spec(data, overrides, source=source)
