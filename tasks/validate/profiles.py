"""The spec's optimisation profiles checked against the model's inputs, default batch ranges filled in."""
from __future__ import annotations

from typing import Dict, List, Tuple

from tasks.shapes import ResolvedProfile, ShapeRange, TensorInfo, default_batch_range, shape_range
from tasks.spec import SPEC_FILENAME, ModelSpec
from tasks.validate.checks import _names
from tasks.validate.report import ValidationReport

ShapeRangeDict = ShapeRange

def _example_range(t: TensorInfo, spec: ModelSpec) -> ShapeRangeDict:
    """A plausible min/opt/max for the fix text (the user adjusts it)."""
    b = spec.build
    out: ShapeRangeDict = {"min": [], "opt": [], "max": []}
    image_like = t.shape is not None and len(t.shape) == 4
    for i, d in enumerate(t.shape or []):
        if isinstance(d, int):
            trio = (d, d, d)
        elif i == 0:
            trio = default_batch_range(b.default_opt_batch, b.default_max_batch)
        elif image_like and i >= 2:
            trio = (64, 224, 512)
        else:
            trio = (1, 128, 512)
        for k, v in zip(("min", "opt", "max"), trio):
            out[k].append(v)
    return out


def profile_yaml(ranges: Dict[str, ShapeRangeDict]) -> str:
    """The ``profiles:`` block of trtflow.yaml holding one profile."""
    lines = ["profiles:"]
    for i, (name, r) in enumerate(ranges.items()):
        lead = "  - " if i == 0 else "    "
        key = name if name.replace("_", "").replace("-", "").isalnum() else f'"{name}"'
        lines.append(f"{lead}{key}: {{min: {r['min']}, opt: {r['opt']}, max: {r['max']}}}")
    return "\n".join(lines)


def resolve_profiles(inputs: List[TensorInfo], spec: ModelSpec, report: ValidationReport) -> List[ResolvedProfile]:
    """The spec's profiles checked against the inputs, with default batch ranges filled in.

    Returns one dict per profile (one when the spec has none): input name -> {"min", "opt", "max"}
    for every input, static ones too (min = opt = max = its shape), as
    tasks/gpu/build.py resolve them. Problems go to ``report`` (errors and warnings); inputs that
    cannot be resolved are left out.
    """
    by_name = {t.name: t for t in inputs}
    resolved: List[ResolvedProfile] = []
    defaulted: Dict[str, ShapeRangeDict] = {}
    followed: List[Tuple[int, str, ShapeRangeDict]] = []
    for k, prof in enumerate([dict(p) for p in spec.profiles] or [{}]):
        out = _named_ranges(k, prof, by_name, report)
        _fill_dynamic(k, prof, out, inputs, spec, report, defaulted, followed)
        for t in inputs:
            if not t.dynamic_dims and t.shape is not None and t.name not in out and t.name not in prof:
                static = [int(d) for d in t.shape]  # type: ignore[arg-type]
                out[t.name] = {"min": list(static), "opt": list(static), "max": list(static)}
        _check_shared_dims(out, by_name, k, report)
        resolved.append({t.name: out[t.name] for t in inputs if t.name in out})  # in input order
    _warn_defaults(defaulted, followed, spec, report)
    return resolved


def _named_ranges(k: int, prof: Dict[str, object], by_name: Dict[str, TensorInfo],
                  report: ValidationReport) -> ResolvedProfile:
    """The ranges profile ``k`` names, each checked against its input (rejected ones left out)."""
    where = f"profile {k} of {SPEC_FILENAME}"
    out: ResolvedProfile = {}
    for name, rng in prof.items():
        r = shape_range(rng)
        t = by_name.get(name)
        if t is None:
            report.error("profile_unknown_input", f"{where} names input {name!r}, which the model does not have "
                         f"(inputs: {', '.join(repr(n) for n in by_name) or 'none'}).",
                         f"Rename {name!r} in {SPEC_FILENAME} to one of the model's inputs.")
            continue
        if t.shape is None:
            continue  # reported as input_rank_unknown
        if len(r["min"]) != len(t.shape):
            report.error("profile_rank_mismatch", f"{where} gives input {name!r} rank {len(r['min'])} "
                         f"({r['opt']}), but the model's input {t.shape_text()} has rank {len(t.shape)}.",
                         f"Give {len(t.shape)} sizes per min/opt/max for {name!r}.")
            continue
        clashes = [i for i, d in enumerate(t.shape) if isinstance(d, int)
                   and any(r[key][i] != d for key in ("min", "opt", "max"))]
        if clashes:
            report.error("profile_static_dim_mismatch",
                         f"{where} sets input {name!r} dim(s) {clashes} to sizes other than the model's fixed "
                         f"{[t.shape[i] for i in clashes]} (model shape {t.shape_text()}; profile min {r['min']}, "
                         f"opt {r['opt']}, max {r['max']}).",
                         "Use the fixed sizes for those dims, or re-export the model with them dynamic.")
            continue
        out[name] = r
    return out


def _fill_dynamic(k: int, prof: Dict[str, object], out: ResolvedProfile, inputs: List[TensorInfo], spec: ModelSpec,
                  report: ValidationReport, defaulted: Dict[str, ShapeRangeDict],
                  followed: List[Tuple[int, str, ShapeRangeDict]]) -> None:
    """Dynamic inputs profile ``k`` does not name: a dynamic batch alone follows the profile's other
    inputs (their batch must agree) or the build defaults; any other dynamic dim is an error."""
    b = spec.build
    by_name = {t.name: t for t in inputs}
    dynamic = [t for t in inputs if t.dynamic_dims]
    batch_from = next((out[n] for n in out if 0 in by_name[n].dynamic_dims), None)
    for t in dynamic:
        if t.name in out or t.shape is None or t.name in prof:
            continue  # resolved, rank unknown (reported), or named but rejected above
        if t.dynamic_dims == [0]:
            if batch_from is not None:
                trio = [batch_from[key][0] for key in ("min", "opt", "max")]
            else:
                trio = list(default_batch_range(b.default_opt_batch, b.default_max_batch))
            r = {key: [v] + [int(d) for d in t.shape[1:]] for key, v in zip(("min", "opt", "max"), trio)}
            out[t.name] = r
            if batch_from is None:
                defaulted.setdefault(t.name, r)
            else:
                followed.append((k, t.name, r))
            continue
        example = profile_yaml({d.name: _example_range(d, spec) for d in dynamic})
        dims = ", ".join(f"{i} ({t.shape[i] if t.shape[i] is not None else '?'})"
                         for i in t.dynamic_dims if i != 0)
        besides = " besides the batch" if 0 in t.dynamic_dims else ""
        if spec.profiles:
            gap = f"profile {k} of {SPEC_FILENAME} does not name it"
        else:
            gap = f"no optimisation profile covers it ({SPEC_FILENAME} has none)"
        report.error("dynamic_dim_without_profile",
                     f"input {t.name!r} {t.shape_text()} has dynamic dim(s) {dims}{besides}, and {gap}; "
                     f"TensorRT needs min/opt/max sizes for every dynamic dim other than the batch.",
                     f"Add an optimisation profile to {SPEC_FILENAME} beside the model (use the smallest, "
                     f"typical and largest sizes you will run):\n{example}")


def _warn_defaults(defaulted: Dict[str, ShapeRangeDict], followed: List[Tuple[int, str, ShapeRangeDict]],
                   spec: ModelSpec, report: ValidationReport) -> None:
    b = spec.build
    if defaulted:
        names = list(defaulted)
        first = defaulted[names[0]]
        report.warn("default_batch_profile",
                    f"input{'s' if len(names) > 1 else ''} {_names(names)} {'have' if len(names) > 1 else 'has'} a "
                    f"dynamic batch (dim 0) and no profile: using batch min/opt/max "
                    f"{first['min'][0]}/{first['opt'][0]}/{first['max'][0]} (build.default_opt_batch="
                    f"{b.default_opt_batch}, build.default_max_batch={b.default_max_batch}).",
                    f"To choose the sizes, add to {SPEC_FILENAME}:\n" + profile_yaml(defaulted))
    for k, name, r in followed:
        report.warn("default_batch_profile",
                    f"profile {k} does not name input {name!r}; its dynamic batch follows the profile's other "
                    f"inputs: min/opt/max {r['min'][0]}/{r['opt'][0]}/{r['max'][0]}.",
                    f"Name {name!r} in profile {k} of {SPEC_FILENAME} to choose otherwise.")


def _check_shared_dims(prof: ResolvedProfile, by_name: Dict[str, TensorInfo], k: int, report: ValidationReport) -> None:
    """A dim_param used by several inputs (e.g. the batch 'N') should get one range per profile."""
    seen: Dict[str, Tuple[str, Tuple[int, int, int]]] = {}
    for name, r in prof.items():
        for i, d in enumerate(by_name[name].shape or []):
            if not isinstance(d, str):
                continue
            trio = (r["min"][i], r["opt"][i], r["max"][i])
            if d in seen and seen[d][1] != trio:
                other, o = seen[d]
                report.warn("profile_inconsistent_dims",
                            f"profile {k}: dim {d!r} is {o[0]}/{o[1]}/{o[2]} for {other!r} but "
                            f"{trio[0]}/{trio[1]}/{trio[2]} for {name!r}; the model says they are the same size.",
                            "Give every input the same min/opt/max for a shared dim.")
            seen.setdefault(d, (name, trio))


