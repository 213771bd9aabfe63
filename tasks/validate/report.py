"""The validation report: what validation found, as data (rendering is in render.py)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from tasks.errors import ModelError
from tasks.shapes import ResolvedProfile, TensorInfo


@dataclass
class Issue:
    """One finding: a stable ``code`` for programs, a ``message`` and a ``fix`` for people."""

    code: str
    message: str
    fix: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ValidationReport:
    """What validation found. Truthy when it has no errors."""

    model_path: str
    trt_version: str  # the target TensorRT the model was judged against
    errors: List[Issue] = field(default_factory=list)
    warnings: List[Issue] = field(default_factory=list)
    ir_version: Optional[int] = None
    opsets: Dict[str, int] = field(default_factory=dict)
    producer: str = ""
    inputs: List[TensorInfo] = field(default_factory=list)
    outputs: List[TensorInfo] = field(default_factory=list)
    operators: Dict[str, int] = field(default_factory=dict)
    model_bytes: int = 0
    external_data_bytes: int = 0
    external_files: List[str] = field(default_factory=list)
    parameters: int = 0
    profiles: List[ResolvedProfile] = field(default_factory=list)
    parser_rules: str = ""  # the compat.PARSER_SUPPORT row applied (e.g. "10" for TensorRT 10.3.1)

    def target(self) -> str:
        """"TensorRT 10.3.1 (parser rules of 10)": which target, and whose rules, the report applies."""
        shown = self.parser_rules and self.parser_rules != self.trt_version
        rules = f" (parser rules of {self.parser_rules})" if shown else ""
        return f"TensorRT {self.trt_version}{rules}"

    @property
    def ok(self) -> bool:
        return not self.errors

    def __bool__(self) -> bool:
        return self.ok

    def error(self, code: str, message: str, fix: Optional[str] = None) -> None:
        self.errors.append(Issue(code, message, fix))

    def warn(self, code: str, message: str, fix: Optional[str] = None) -> None:
        self.warnings.append(Issue(code, message, fix))

    def codes(self) -> List[str]:
        return [e.code for e in self.errors]

    def warning_codes(self) -> List[str]:
        return [w.code for w in self.warnings]

    def input(self, name: str) -> Optional[TensorInfo]:
        return next((t for t in self.inputs if t.name == name), None)

    def opt_shapes(self, profile: int = 0) -> Dict[str, List[int]]:
        """Every input's shape at the profile's opt point."""
        prof = self.profiles[profile] if self.profiles else {}
        return {name: list(r["opt"]) for name, r in prof.items()}

    def inputs_list(self) -> List[dict]:
        """The inputs as plain dicts (name, dtype, shape, dynamic_dims)."""
        return [t.to_dict() for t in self.inputs]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "ValidationReport":
        data = {k: v for k, v in data.items() if k != "ok"}
        data["errors"] = [Issue(**e) for e in data.get("errors", [])]
        data["warnings"] = [Issue(**w) for w in data.get("warnings", [])]
        data["inputs"] = [TensorInfo(**t) for t in data.get("inputs", [])]
        data["outputs"] = [TensorInfo(**t) for t in data.get("outputs", [])]
        return cls(**data)

    def to_model_error(self) -> ModelError:
        """One ModelError naming every error (details keep them one by one)."""
        name = Path(self.model_path).name
        count = len(self.errors)
        head = f"{name} failed validation for {self.target()} ({count} error{'s' if count != 1 else ''}): "
        message = head + " ".join(f"[{e.code}] {e.message}" for e in self.errors)
        fixes = [e.fix for e in self.errors if e.fix]
        return ModelError(message, fix=" | ".join(dict.fromkeys(fixes)) or None,
                          details=[e.to_dict() for e in self.errors])

    def raise_for_errors(self) -> "ValidationReport":
        if self.errors:
            raise self.to_model_error()
        return self

    # ---- human output (tasks/validate/render.py) ----
    def summary_lines(self) -> List[str]:
        """A plain-text report (CLI, logs)."""
        from tasks.validate.render import report_lines

        return report_lines(self)

    def summary_markdown(self) -> str:
        """A Markdown report (Prefect artifact)."""
        from tasks.validate.render import report_markdown

        return report_markdown(self)

