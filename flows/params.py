"""Parameters of the convert-model deployment: a pydantic model, so the Prefect UI shows a real form.

Every field has a concrete type and default (no ``Optional[...] = None``): the UI renders Optional
fields as a ``Property is type "None"`` toggle. "Keep the model's trtflow.yaml" is spelled as an
empty list / empty mapping / ``strategy="spec"`` instead, and :meth:`ConvertRequest.spec_overrides`
maps those to "no override".
"""
from __future__ import annotations

from typing import Dict, List, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.spec import ModelSpec, Precision, Tolerance

SPEC_STRATEGY = "spec"  # the request's "use what trtflow.yaml says"
# The spec's strategies (fallback, all, and whatever tasks/spec.py adds), so the form never offers one it rejects.
SPEC_STRATEGIES = get_args(ModelSpec.model_fields["strategy"].annotation)


class ConvertRequest(BaseModel):
    """One conversion: which model, and what to change from its trtflow.yaml for this run."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str = Field(..., description="s3://BUCKET/models/NAME.onnx, s3://BUCKET/models/NAME/ or a local "
                                            "BUCKET-FOLDER/models/NAME.onnx",
                           examples=["s3://my-models/models/resnet50.onnx"])
    precisions: List[Precision] = Field(
        default_factory=list,
        description="Precisions in preference order; empty = the model's trtflow.yaml (default int8, fp16, fp32)")
    strategy: Literal[(SPEC_STRATEGY,) + SPEC_STRATEGIES] = Field(  # type: ignore[valid-type]
        SPEC_STRATEGY, description="'fallback' stops at the first passing precision; 'all' builds every one; "
                                   "'spec' = as the model's trtflow.yaml says (default fallback)")
    tolerances: Dict[Precision, Dict[str, float]] = Field(
        default_factory=dict,
        description="Accuracy gates per precision overriding the spec's, e.g. {\"int8\": {\"min_cosine\": 0.98}} "
                    "(keys min_cosine, max_abs, max_rel, min_top1); empty = the spec's")
    force: bool = Field(False, description="Rebuild even when an engine for this model, spec, TensorRT and GPU exists")
    package_fingerprint: str = Field(
        "", description="Set by watch-bucket: the listing fingerprint of the package version it saw "
                        "(tasks.watch_state.package_fingerprint); empty = whatever the bucket holds now")

    @field_validator("tolerances")
    @classmethod
    def _known_gates(cls, value: Dict[Precision, Dict[str, float]]) -> Dict[Precision, Dict[str, float]]:
        for gates in value.values():
            Tolerance(**gates)  # unknown gate names and out-of-range values fail here, by name
        return value

    def spec_overrides(self) -> dict:
        """The part of this request that overrides the model's trtflow.yaml (empty = keep)."""
        out: dict = {}
        if self.precisions:
            out["precisions"] = [str(p) for p in self.precisions]
        if self.tolerances:
            out["tolerances"] = {str(k): dict(v) for k, v in self.tolerances.items()}
        if self.strategy != SPEC_STRATEGY:
            out["strategy"] = self.strategy
        return out
