"""A ValidationReport as text for people: plain lines (CLI, logs) and Markdown (Prefect artifact)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from tasks.validate.report import ValidationReport


def report_lines(report: "ValidationReport") -> List[str]:
    """A plain-text report (CLI, logs)."""
    lines = [f"{Path(report.model_path).name}: {'OK' if report.ok else 'FAILED'} for {report.target()} "
             f"({len(report.errors)} error(s), {len(report.warnings)} warning(s))"]
    if report.ir_version is not None:
        opsets = ", ".join(f"{k} {v}" for k, v in sorted(report.opsets.items()))
        lines.append(f"  IR {report.ir_version}, opsets: {opsets or 'none'}, producer: {report.producer or '-'}")
        lines.append(f"  size: {_human_bytes(report.model_bytes)} model + {_human_bytes(report.external_data_bytes)} "
                     f"external data ({len(report.external_files)} file(s)), {report.parameters:,} parameters")
    for t in report.inputs:
        dyn = f" dynamic dims {t.dynamic_dims}" if t.dynamic_dims else ""
        lines.append(f"  input  {t.name}: {t.dtype} {t.shape_text()}{dyn}")
    for t in report.outputs:
        lines.append(f"  output {t.name}: {t.dtype} {t.shape_text()}")
    for i, prof in enumerate(report.profiles):
        for name, rng in prof.items():
            if rng["min"] != rng["max"]:  # static inputs' ranges say nothing new
                lines.append(f"  profile {i} {name}: min {rng['min']} opt {rng['opt']} max {rng['max']}")
    if report.operators:
        top = sorted(report.operators.items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append("  operators: " + ", ".join(f"{op} x{n}" for op, n in top))
    for e in report.errors:
        lines.append(f"  ERROR [{e.code}] {e.message}")
        if e.fix:
            lines.extend("        fix: " + ln if i == 0 else "             " + ln
                         for i, ln in enumerate(e.fix.splitlines()))
    for w in report.warnings:
        lines.append(f"  warning [{w.code}] {w.message}")
    return lines

def report_markdown(report: "ValidationReport") -> str:
    """A Markdown report (Prefect artifact)."""
    name = Path(report.model_path).name
    out = [f"### Validation of `{name}`: {'✅ OK' if report.ok else '❌ FAILED'} ({report.target()})", ""]
    if report.ir_version is not None:
        opsets = ", ".join(f"{k} {v}" for k, v in sorted(report.opsets.items()))
        out += [f"IR {report.ir_version} · opsets {opsets or 'none'} · producer `{report.producer or '-'}` · "
                f"{_human_bytes(report.model_bytes)} model + {_human_bytes(report.external_data_bytes)} external data · "
                f"{report.parameters:,} parameters", ""]
    if report.inputs or report.outputs:
        out += ["| | name | dtype | shape | dynamic dims |", "|---|---|---|---|---|"]
        out += [f"| input | `{t.name}` | {t.dtype} | {t.shape_text()} | {t.dynamic_dims or ''} |" for t in report.inputs]
        out += [f"| output | `{t.name}` | {t.dtype} | {t.shape_text()} | {t.dynamic_dims or ''} |" for t in report.outputs]
        out.append("")
    if any(r["min"] != r["max"] for prof in report.profiles for r in prof.values()):
        out += ["| profile | input | min | opt | max |", "|---|---|---|---|---|"]
        for i, prof in enumerate(report.profiles):
            out += [f"| {i} | `{n}` | {r['min']} | {r['opt']} | {r['max']} |" for n, r in prof.items()
                    if r["min"] != r["max"]]
        out.append("")
    if report.errors:
        out += ["**Errors**", ""]
        for e in report.errors:
            out.append(f"- `{e.code}`: {e.message}")
            if e.fix:
                fix = e.fix.replace("\n", "\n  ")
                out.append(f"  - fix: {fix}" if "\n" not in e.fix else f"  - fix:\n\n  ```\n  {fix}\n  ```")
        out.append("")
    if report.warnings:
        out += ["**Warnings**", ""] + [f"- `{w.code}`: {w.message}" for w in report.warnings] + [""]
    if report.operators:
        top = sorted(report.operators.items(), key=lambda kv: (-kv[1], kv[0]))
        out += ["**Operators**: " + ", ".join(f"{op} ×{n}" for op, n in top), ""]
    return "\n".join(out)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
