"""Optimisation profiles: the spec's, completed with the one default trtflow allows.

A dynamic dim 0 (the batch) without a profile gets min 1 / opt ``build.default_opt_batch`` / max
``build.default_max_batch``. Any other dynamic dim needs a profile in trtflow.yaml: guessing an
image size or sequence length would build an engine that silently rejects real inputs.

Python 3.9-compatible and Prefect-free.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

from tasks.errors import ModelError
from tasks.spec import ModelSpec

Dim = Union[int, str, None]
ShapeDict = Dict[str, List[int]]  # {"min": [...], "opt": [...], "max": [...]}


def _is_dynamic(d: Dim) -> bool:
    return not isinstance(d, int) or d <= 0


def _profile_hint(name: str, shape: Sequence[Dim]) -> str:
    def fill(v: int) -> str:
        return "[" + ", ".join(str(d) if not _is_dynamic(d) else str(v) for d in shape) + "]"
    return (f"add to trtflow.yaml:\n  profiles:\n    - {name}: {{min: {fill(1)}, opt: {fill(8)}, max: {fill(32)}}}\n"
            f"(replace the dynamic dims with the sizes you serve)")


def resolve_profiles(inputs: Sequence[dict], spec: ModelSpec) -> List[Dict[str, ShapeDict]]:
    """Full min/opt/max shapes for every input of every profile.

    Args:
        inputs: ``[{"name": str, "shape": [int | str | None, ...]}, ...]`` as the validator reports them.
        spec: the model's spec.

    Returns:
        One dict per profile: input name -> {"min", "opt", "max"} (static inputs included).

    Raises:
        ModelError: a profile names an unknown input, has the wrong rank, contradicts a static dim,
            or a non-batch dynamic dim has no profile.
    """
    by_name = {i["name"]: list(i["shape"] or []) for i in inputs}
    user = [{k: v.model_dump() for k, v in p.items()} for p in spec.profiles] or [{}]
    out = []
    for index, profile in enumerate(user):
        unknown = sorted(set(profile) - set(by_name))
        if unknown:
            raise ModelError(f"profile {index} names {', '.join(unknown)}, which the model has no input called.",
                             fix=f"Use the model's input names: {', '.join(by_name)}.")
        resolved: Dict[str, ShapeDict] = {}
        for name, shape in by_name.items():
            if name in profile:
                rng = profile[name]
                if len(rng["min"]) != len(shape):
                    raise ModelError(f"profile {index} gives input {name!r} rank {len(rng['min'])}, the model has rank {len(shape)}.",
                                     fix=f"Give {len(shape)} dims for {name}: {shape}.")
                for axis, d in enumerate(shape):
                    if not _is_dynamic(d) and not (rng["min"][axis] == rng["opt"][axis] == rng["max"][axis] == d):
                        raise ModelError(f"profile {index} sets dim {axis} of {name!r} to {rng['min'][axis]}..{rng['max'][axis]}, "
                                         f"but the model fixes it at {d}.", fix=f"Use {d} for min, opt and max of that dim.")
                resolved[name] = {k: list(rng[k]) for k in ("min", "opt", "max")}
                continue
            lo, mid, hi = [], [], []
            for axis, d in enumerate(shape):
                if not _is_dynamic(d):
                    lo.append(d), mid.append(d), hi.append(d)
                elif axis == 0:
                    lo.append(1), mid.append(spec.build.default_opt_batch), hi.append(max(spec.build.default_max_batch,
                                                                                           spec.build.default_opt_batch))
                else:
                    raise ModelError(f"input {name!r} has dynamic dim {axis} ({d!r}) and no optimisation profile.",
                                     fix=_profile_hint(name, shape))
            resolved[name] = {"min": lo, "opt": mid, "max": hi}
        out.append(resolved)
    return out


def opt_shapes(profile: Dict[str, ShapeDict]) -> Dict[str, List[int]]:
    return {name: list(r["opt"]) for name, r in profile.items()}
