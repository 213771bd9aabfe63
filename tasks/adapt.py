"""Model rewrites before the TensorRT build, each one recorded for the manifest.

A model that ONNX Runtime runs can still be refused by a TensorRT parser for reasons a rewrite
fixes without changing what the model computes:

- ``lower_ir``: the IR number is newer than the parser reads, but the model uses no feature of the
  newer IR (e.g. onnx >= 1.16 writes IR 10 for a plain opset-17 graph).
- ``convert_opset``: the opset is newer than the parser supports; onnx's version converter
  rewrites the changed operators (ReduceMean axes as input in 18, ...).
- ``split_shared_dims``: two dims share one dim_param but the profile gives them different
  ranges; TensorRT takes same-named dims as equal ("Input dimensions with this name are
  inconsistent"), so they are renamed apart.
- ``sanitise``: constant folding + cleanup + shape inference, which resolves e.g. a Slice whose
  axes come from a constant subgraph (TensorRT 8.6: "This version of TensorRT does not support
  dynamic axes").

Every step works on the model's graph with its weights left on disk (``load_external_data=False``):
a >2 GB model is never read into memory, and its external data files are linked beside the
adapted model. The one entry point is :func:`adapt_for_target`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import onnx
from onnx import TensorProto

from tasks.errors import ModelError
from tasks.onnx_graphs import graphs as _graphs

SANITISE_MODES = ("on-failure", "always", "never")
ADAPTED_FILENAME = "model.onnx"


# ---- the typed results --------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptRecord:
    """One rewrite: which step, the value before and after, and why (for the manifest)."""

    name: str
    before: str
    after: str
    why: str
    applied: bool = True  # False: the step was tried or considered and left the model as it was

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AdaptResult:
    """The model to build (``path``: the original when nothing changed) and what was done to it."""

    path: Path
    records: List[AdaptRecord] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(r.applied for r in self.records)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "changed": self.changed, "records": [r.to_dict() for r in self.records]}


@dataclass(frozen=True)
class TargetLimits:
    """What the target's ONNX parser reads. tasks.gpu.compat.Caps and compat.ParserSupport
    carry the same facts under other names; :meth:`of` accepts any of them."""

    parser_max_ir: int
    parser_max_opset: int
    parser_min_opset: int = 7

    @classmethod
    def of(cls, limits: Any) -> "TargetLimits":
        if isinstance(limits, TargetLimits):
            return limits
        for max_ir, max_opset, min_opset in (("parser_max_ir", "parser_max_opset", "parser_min_opset"),
                                             ("max_ir", "max_opset", "min_opset")):
            if hasattr(limits, max_ir) and hasattr(limits, max_opset):
                return cls(int(getattr(limits, max_ir)), int(getattr(limits, max_opset)),
                           int(getattr(limits, min_opset, 7) or 7))
        raise TypeError(f"{type(limits).__name__} has no parser_max_ir/parser_max_opset: pass a TargetLimits, "
                        "tasks.gpu.compat.Caps or tasks.gpu.compat.ParserSupport")


# ---- walking the model --------------------------------------------------------------------------
def _all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    yield from _graphs(model.graph)
    for fn in model.functions:
        for node in fn.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from _graphs(attr.g)


def _nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for g in _all_graphs(model):
        yield from g.node
    for fn in model.functions:
        yield from fn.node


def _type_elem_types(tp: onnx.TypeProto) -> Iterator[int]:
    kind = tp.WhichOneof("value")
    if kind in ("tensor_type", "sparse_tensor_type"):
        yield getattr(tp, kind).elem_type
    elif kind == "sequence_type":
        yield from _type_elem_types(tp.sequence_type.elem_type)
    elif kind == "optional_type":
        yield from _type_elem_types(tp.optional_type.elem_type)
    elif kind == "map_type":
        yield tp.map_type.key_type
        yield from _type_elem_types(tp.map_type.value_type)


def _elem_types(model: onnx.ModelProto) -> Iterator[Tuple[int, str]]:
    """Every data type the model names, with where (tensor, value info, or a node's dtype attribute)."""
    for g in _all_graphs(model):
        for t in g.initializer:
            yield t.data_type, f"initializer {t.name!r}"
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            for et in _type_elem_types(vi.type):
                yield et, f"tensor {vi.name!r}"
    for node in _nodes(model):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t.data_type, f"node {node.name or node.op_type!r} attribute {attr.name}"
            elif attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype", "output_dtype"):
                yield attr.i, f"node {node.name or node.op_type!r} attribute {attr.name}"


# ---- 1a: IR lowering ----------------------------------------------------------------------------
# The IR version each data type first appeared in (onnx/docs/IR.md history; onnx.helper.VERSION_TABLE
# maps releases to IR): IR 9 = onnx 1.14 (float8), IR 10 = onnx 1.16 (4-bit ints), IR 11 = onnx
# 1.18 (float4e2m1), IR 12 = onnx 1.19 (float8e8m0), IR 13 = onnx 1.20 (2-bit ints), IR 14 = onnx 1.23 (float6). Looked up by
# name because older onnx packages lack the newer members.
_DTYPE_SINCE_IR = {"FLOAT8E4M3FN": 9, "FLOAT8E4M3FNUZ": 9, "FLOAT8E5M2": 9, "FLOAT8E5M2FNUZ": 9,
                   "UINT4": 10, "INT4": 10, "FLOAT4E2M1": 11, "FLOAT8E8M0": 12, "UINT2": 13, "INT2": 13,
                   "FLOAT6E2M3": 14, "FLOAT6E3M2": 14}


def _dtype_min_ir() -> Dict[int, Tuple[str, int]]:
    out = {}
    for name, ir in _DTYPE_SINCE_IR.items():
        if name in TensorProto.DataType.keys():
            out[int(TensorProto.DataType.Value(name))] = (name, ir)
    return out


def ir_features(model: onnx.ModelProto) -> List[Tuple[int, str]]:
    """Features of the model that need a given IR version or newer: [(ir, what)], newest first."""
    found: List[Tuple[int, str]] = []
    by_dtype = _dtype_min_ir()
    seen = set()
    for et, where in _elem_types(model):
        if et in by_dtype and (et, where) not in seen:
            seen.add((et, where))
            name, ir = by_dtype[et]
            found.append((ir, f"data type {name} ({where})"))
    if model.functions:
        found.append((8, f"{len(model.functions)} model-local function(s) "
                         f"({', '.join(f.name for f in list(model.functions)[:3])})"))
        if any(getattr(f, "overload", "") for f in model.functions):
            found.append((10, "function overloads (FunctionProto.overload)"))
        if any(len(getattr(f, "value_info", [])) for f in model.functions):
            found.append((10, "value_info inside a function"))
    if any(getattr(n, "overload", "") for n in _nodes(model)):
        found.append((10, "a node calling a function overload (NodeProto.overload)"))
    if len(getattr(model, "configuration", [])) or any(len(getattr(n, "device_configurations", []))
                                                       for n in _nodes(model)):
        found.append((11, "multi-device configuration"))
    return sorted(found, key=lambda f: -f[0])


def _strip_metadata_props(model: onnx.ModelProto) -> int:
    """Node/graph metadata_props arrived with IR 10 and are annotations only (TensorRT ignores them)."""
    removed = 0
    for g in _all_graphs(model):
        if hasattr(g, "metadata_props"):
            removed += len(g.metadata_props)
            del g.metadata_props[:]
        for node in g.node:
            if hasattr(node, "metadata_props"):
                removed += len(node.metadata_props)
                del node.metadata_props[:]
    return removed


def lower_ir(model: onnx.ModelProto, limits: Any) -> Optional[AdaptRecord]:
    """Set ``model.ir_version`` to the parser's maximum when the model uses nothing newer (in place).

    Returns None when the IR is already readable. Raises ModelError naming the feature that needs
    the newer IR otherwise.
    """
    target = TargetLimits.of(limits).parser_max_ir
    before = int(model.ir_version)
    if before <= target:
        return None
    blockers = [(ir, what) for ir, what in ir_features(model) if ir > target]
    if blockers:
        ir, what = blockers[0]
        raise ModelError(f"the model's IR {before} is newer than the target parser reads (IR <= {target}), and it "
                         f"uses {what}, which needs IR {ir}: lowering the number would misdescribe the model.",
                         fix=f"Export without {what.split(' (')[0]} (e.g. keep weights in float16/float32 and "
                             f"inline functions), or build on a TensorRT whose parser reads IR {ir}.")
    stripped = _strip_metadata_props(model)
    model.ir_version = target
    note = f"; dropped {stripped} metadata_props annotations (IR 10 field)" if stripped else ""
    return AdaptRecord("lower_ir", f"IR {before}", f"IR {target}",
                       f"the target parser reads IR <= {target} and the model uses no feature newer than IR "
                       f"{target} (checked data types, local functions, overloads){note}")


# ---- 1b: opset conversion -----------------------------------------------------------------------
def default_opset(model: onnx.ModelProto) -> Optional[int]:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    return None


def changed_ops(model: onnx.ModelProto, target: int) -> List[str]:
    """ai.onnx ops of the model whose definition changed after opset ``target`` (what the converter
    must rewrite, and what to name when it cannot)."""
    current = default_opset(model) or target
    out = []
    for op in sorted({n.op_type for n in _nodes(model) if n.domain in ("", "ai.onnx")}):
        try:
            now = onnx.defs.get_schema(op, current).since_version
        except Exception:  # noqa: BLE001 - an op unknown to this onnx: name it as changed
            out.append(op)
            continue
        if now > target:
            out.append(op)
    return out


def convert_opset(model: onnx.ModelProto, limits: Any) -> Tuple[onnx.ModelProto, Optional[AdaptRecord]]:
    """Convert the ai.onnx opset down to the parser's maximum with onnx.version_converter.

    Returns (model, record); (model, None) when the opset is already supported. Raises ModelError
    naming the operators when the converter or the checker refuses the result.
    """
    lim = TargetLimits.of(limits)
    before = default_opset(model)
    if before is None or before <= lim.parser_max_opset:
        return model, None
    ops = changed_ops(model, lim.parser_max_opset)
    ir = model.ir_version
    try:
        from onnx import version_converter
        converted = version_converter.convert_version(model, lim.parser_max_opset)
        converted.ir_version = min(int(converted.ir_version), ir) if ir else converted.ir_version
        if not _has_external_data(converted):  # else the in-memory checker looks for the data files
            onnx.checker.check_model(converted)  # relative to the cwd; the saved file is checked by path
    except Exception as err:  # noqa: BLE001 - the converter raises RuntimeError/ValidationError/...
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        named = ", ".join(ops) or "unknown"
        raise ModelError(f"opset {before} is newer than the target parser supports (<= {lim.parser_max_opset}) and "
                         f"onnx.version_converter could not convert it: {text} (operators changed after opset "
                         f"{lim.parser_max_opset}: {named}).",
                         fix=f"Re-export with opset_version={lim.parser_max_opset} (torch.onnx.export(..., "
                             f"opset_version={lim.parser_max_opset})), or replace {named}; or build on a TensorRT "
                             f"that reads opset {before}.") from None
    record = AdaptRecord("convert_opset", f"opset {before}", f"opset {lim.parser_max_opset}",
                         f"the target parser supports opset {lim.parser_min_opset} to {lim.parser_max_opset}; "
                         f"onnx.version_converter rewrote {', '.join(ops) or 'no operator (none changed)'}, "
                         f"onnx.checker accepts the result")
    return converted, record


# ---- 1c: dims sharing a dim_param with different ranges -----------------------------------------
def _trio(rng: Any, axis: int) -> Tuple[int, int, int]:
    if isinstance(rng, Mapping):
        return int(rng["min"][axis]), int(rng["opt"][axis]), int(rng["max"][axis])
    return int(rng.min[axis]), int(rng.opt[axis]), int(rng.max[axis])


def _dim_signature(profiles: Sequence[Mapping[str, Any]], name: str, axis: int) -> Optional[tuple]:
    sig = []
    for prof in profiles:
        rng = prof.get(name)
        if rng is None:
            return None  # not every profile covers it: leave it alone
        sig.append(_trio(rng, axis))
    return tuple(sig)


def split_shared_dims(model: onnx.ModelProto, profiles: Sequence[Mapping[str, Any]]) -> List[AdaptRecord]:
    """Rename apart dims that share a dim_param but get different ranges in the profiles (in place).

    Dims whose ranges agree stay shared (the batch of input_ids and attention_mask). A group is
    renamed ``<param>_<axis>`` (``<param>_<input>_<axis>`` where two groups share an axis). Other
    tensors that still name the old dim_param lose it (become unnamed): the old name no longer
    means one size.
    """
    if not profiles:
        return []
    uses: Dict[str, Dict[tuple, List[Tuple[str, int]]]] = {}
    for inp in model.graph.input:
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_param") and d.dim_param:
                sig = _dim_signature(profiles, inp.name, axis)
                if sig is not None:
                    uses.setdefault(d.dim_param, {}).setdefault(sig, []).append((inp.name, axis))
    records: List[AdaptRecord] = []
    renamed_params = set()
    for param, groups in uses.items():
        if len(groups) < 2:
            continue
        axes = [dims[0][1] for dims in groups.values()]
        by_input = {n: d for n, d in ((i.name, i) for i in model.graph.input)}
        for sig, dims in groups.items():
            first_input, first_axis = dims[0]
            new = f"{param}_{first_axis}" if axes.count(first_axis) == 1 else f"{param}_{first_input}_{first_axis}"
            for name, axis in dims:
                by_input[name].type.tensor_type.shape.dim[axis].dim_param = new
            where = ", ".join(f"{n} dim {a}" for n, a in dims)
            ranges = "; ".join("/".join(str(v) for v in trio) for trio in sig)
            records.append(AdaptRecord("split_shared_dims", f"{where}: {param!r}", f"{new!r}",
                                       f"dim_param {param!r} is shared by dims the profiles give different ranges "
                                       f"(here min/opt/max {ranges}); TensorRT takes same-named dims as equal "
                                       f"('Input dimensions with this name are inconsistent')"))
        renamed_params.add(param)
    if renamed_params:
        _forget_dim_params(model, renamed_params)
    return records


def _forget_dim_params(model: onnx.ModelProto, params: Iterable[str]) -> None:
    params = set(params)
    for g in _graphs(model.graph):
        infos = list(g.output) + list(g.value_info) + ([] if g is model.graph else list(g.input))
        for vi in infos:
            if vi.type.WhichOneof("value") != "tensor_type":
                continue
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in params:
                    d.Clear()  # unknown size: shape inference or TensorRT works it out


# ---- 1d: sanitise (constant folding, cleanup, shape inference) ----------------------------------
def _constant_names(graph: onnx.GraphProto) -> set:
    names = {t.name for t in graph.initializer}
    names.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    return names


def dynamic_slices(model: onnx.ModelProto) -> List[str]:
    """Slice nodes whose starts/ends/axes/steps are computed, not constants: TensorRT 8.6's parser
    rejects computed axes ("This version of TensorRT does not support dynamic axes"), which constant
    folding resolves when the computation is itself constant."""
    out = []
    constants = _constant_names(model.graph)
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Slice" and any(name and name not in constants for name in node.input[1:]):
            out.append(node.name or f"Slice #{i}")
    return out


def _weights_as_inputs(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, List[onnx.TensorProto]]:
    """A copy whose external-data initializers are graph inputs instead: the folder then treats them
    as unknown and never reads them (a 2 GB weight is not worth folding, and reading it would hold
    the model in memory twice)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    external = [t for t in work.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        keep = [t for t in work.graph.initializer if t.data_location != TensorProto.EXTERNAL]
        del work.graph.initializer[:]
        work.graph.initializer.extend(keep)
        work.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                for t in external)
    return work, external


def _restore_weights(model: onnx.ModelProto, external: List[onnx.TensorProto]) -> None:
    names = {t.name for t in external}
    used = {i for g in _graphs(model.graph) for n in g.node for i in n.input}  # subgraphs read outer weights too
    inputs = [vi for vi in model.graph.input if vi.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(t for t in external if t.name in used)


def sanitise(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, AdaptRecord]:
    """Fold constants, drop dead nodes, sort, infer shapes. Never raises: a model it cannot handle
    comes back unchanged with a record (applied=False) that says why.

    onnx-graphsurgeon over onnxsim: it is NVIDIA's own tool for preparing graphs for TensorRT,
    pure Python (onnxsim ships compiled wheels per Python version, and the GPU workers run 3.9 and
    3.12), folds with ONNX Runtime, and leaves ops it cannot evaluate in place instead of failing.
    """
    before_nodes = len(model.graph.node)
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        return model, AdaptRecord("sanitise", f"{before_nodes} nodes", f"{before_nodes} nodes",
                                  "not run: onnx-graphsurgeon is not installed (pip install onnx-graphsurgeon)",
                                  applied=False)
    try:
        work, external = _weights_as_inputs(model)
        graph = gs.import_onnx(work)
        graph.fold_constants().cleanup().toposort()
        out = gs.export_onnx(graph)
        _restore_weights(out, external)
        out.ir_version = model.ir_version  # export_onnx stamps the installed onnx's IR
        del out.opset_import[:]
        out.opset_import.extend(model.opset_import)
        out.producer_name, out.producer_version = model.producer_name, model.producer_version
        out.metadata_props.extend(model.metadata_props)
        out = onnx.shape_inference.infer_shapes(out)
        if not external:  # with external data the in-memory checker looks for files relative to the
            onnx.checker.check_model(out)  # cwd; adapt_for_target checks the saved file by path
    except Exception as err:  # noqa: BLE001 - sanitise is best effort: the original still goes to the build
        text = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        return model, AdaptRecord("sanitise", f"{before_nodes} nodes", f"{before_nodes} nodes",
                                  f"not applied: folding failed ({type(err).__name__}: {text}); the original is built",
                                  applied=False)
    left = dynamic_slices(out)
    why = (f"constant folding + cleanup (onnx-graphsurgeon) and onnx shape inference; "
           f"{before_nodes - len(out.graph.node)} nodes folded or removed")
    if left:
        why += f"; Slice nodes still with computed inputs: {', '.join(left[:4])}"
    return out, AdaptRecord("sanitise", f"{before_nodes} nodes", f"{len(out.graph.node)} nodes", why)


# ---- 1e: the entry point ------------------------------------------------------------------------
SMALL_TENSOR_BYTES = 1 << 20


def inline_small_external_data(model: onnx.ModelProto, base_dir: Path, limit: int = SMALL_TENSOR_BYTES) -> int:
    """Read external tensors under ``limit`` bytes into the model (in place); returns how many.

    The version converter and constant folding need the values of small constants (Reshape
    shapes, Slice indices, ReduceMean axes), which a model saved with ``size_threshold=0`` keeps
    in its data file; the large weights stay where they are.
    """
    from onnx.external_data_helper import load_external_data_for_tensor

    count = 0
    for g in _graphs(model.graph):
        for t in g.initializer:
            if t.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            if int(info.get("length", limit + 1)) > limit:
                continue
            load_external_data_for_tensor(t, str(base_dir))
            t.data_location = TensorProto.DEFAULT
            del t.external_data[:]
            count += 1
    return count


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for g in _graphs(model.graph) for t in g.initializer)


def adapted_path(model: onnx.ModelProto, model_path: Path, out_dir: Path) -> Path:
    """Where the adapted model goes: ``out_dir/model.onnx``; beside the original
    (``<name>.adapted.onnx``) when its weights are external data, so the data files resolve where
    they lie. Links will not do: onnx's checker and ONNX Runtime refuse hard and symbolic links for
    external data (a path-escape guard), and a copy of gigabytes is what the step must avoid."""
    if _has_external_data(model):
        return model_path.with_name(model_path.stem + ".adapted.onnx")
    return out_dir / ADAPTED_FILENAME


def adapt_for_target(model_path: Path, out_dir: Path, limits: Any,
                     profiles: Sequence[Mapping[str, Any]] = (), *, sanitise_mode: str = "on-failure"
                     ) -> AdaptResult:
    """Rewrite ``model_path`` so the target's parser reads it; write the result to ``out_dir``.

    Args:
        model_path: the .onnx file; external data is read where it lies, never loaded.
        out_dir: where the adapted ``model.onnx`` goes (a model with external data: beside the
            original instead, see adapted_path).
        limits: the target parser's limits: TargetLimits, tasks.gpu.compat.Caps (parser_max_ir,
            parser_max_opset) or tasks.gpu.compat.ParserSupport.
        profiles: the resolved profiles (validate.resolve_profiles: input -> {min, opt, max}) or
            the spec's (input -> ShapeRange).
        sanitise_mode: "always"; "never"; "on-failure" (the default): only when the model holds a
            pattern the parser is known to reject (a Slice with computed inputs) - call again with
            "always" after the parser rejected the original.

    Returns AdaptResult: ``path`` is ``model_path`` itself when nothing changed.
    Raises ModelError when the IR or opset cannot be brought within the limits (naming why).
    """
    if sanitise_mode not in SANITISE_MODES:
        raise ModelError(f"sanitise mode {sanitise_mode!r} is not one of {', '.join(SANITISE_MODES)}.",
                         fix="Use 'on-failure' (default), 'always' or 'never'.")
    model_path, out_dir = Path(model_path), Path(out_dir)
    model = onnx.load(str(model_path), load_external_data=False)
    inline_small_external_data(model, model_path.parent, SMALL_TENSOR_BYTES)
    records: List[AdaptRecord] = []
    model, record = convert_opset(model, limits)  # first: the converter may stamp a newer IR
    records += [record] if record else []
    record = lower_ir(model, limits)
    records += [record] if record else []
    records += split_shared_dims(model, profiles)
    slices = dynamic_slices(model)
    if sanitise_mode == "always" or (sanitise_mode == "on-failure" and slices):
        model, record = sanitise(model)
        if sanitise_mode == "on-failure":
            record = AdaptRecord(record.name, record.before, record.after,
                                 f"Slice with computed inputs ({', '.join(slices[:4])}): " + record.why, record.applied)
        records.append(record)
    if not any(r.applied for r in records):
        return AdaptResult(model_path, records)
    out_path = adapted_path(model, model_path, out_dir)
    if out_path.resolve() == model_path.resolve():
        raise ModelError(f"adapt_for_target would overwrite its input {model_path}.",
                         fix="Pass an out_dir other than the model's folder.")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out_path))
    onnx.checker.check_model(str(out_path))  # by path: resolves the external data, works past 2 GB
    return AdaptResult(out_path, records)
