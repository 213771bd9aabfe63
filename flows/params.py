"""Parameters of the convert-model deployment: a pydantic model, so the Prefect UI shows a form."""
from __future__ import annotations

from typing import Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field

from tasks.spec import Precision, Tolerance


class ConvertRequest(BaseModel):
    """One conversion: which model, and what to change from its trtflow.yaml for this run."""

    model_config = ConfigDict(extra="forbid")

    model_uri: str = Field(..., description="s3://BUCKET/models/NAME.onnx, s3://BUCKET/models/NAME/ or a local "
                                            "BUCKET-FOLDER/models/NAME.onnx",
                           examples=["s3://my-models/models/resnet50.onnx"])
    precisions: Optional[List[Precision]] = Field(
        None, description="Precisions in preference order (empty = the spec's, default int8, fp16, fp32)")
    tolerances: Optional[Dict[Precision, Tolerance]] = Field(
        None, description="Accuracy gates per precision, overriding the spec's (e.g. int8: min_cosine 0.98)")
    strategy: Optional[str] = Field(None, description="'fallback' stops at the first passing precision; 'all' builds every one",
                                    pattern="^(fallback|all)$")
    force: bool = Field(False, description="Rebuild even when an engine for this model, spec, TensorRT and GPU exists")

    def spec_overrides(self) -> dict:
        """The part of this request that overrides the model's trtflow.yaml (None = keep)."""
        out: dict = {}
        if self.precisions:
            out["precisions"] = [str(p.value if hasattr(p, "value") else p) for p in self.precisions]
        if self.tolerances:
            out["tolerances"] = {str(k.value if hasattr(k, "value") else k): v.model_dump(exclude_none=True)
                                 for k, v in self.tolerances.items()}
        if self.strategy:
            out["strategy"] = self.strategy
        return out
