"""Reading an ONNX file for validation: the proto without its weights, and every tensor in it."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import onnx
from google.protobuf.message import DecodeError

from tasks.onnx_graphs import graphs as _graphs
from tasks.validate.report import ValidationReport

_REEXPORT_FIX = ("Re-export the model to ONNX (e.g. torch.onnx.export(..., opset_version=17)) and re-upload it; "
                 "if an upload was interrupted, upload the file again.")


def _sniff(head: bytes) -> str:
    """A hint at what a non-ONNX file is, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return " It is a zip archive (a PyTorch .pt/.pth checkpoint or a zipped model?): export it to ONNX first."
    if head.lstrip()[:1] in (b"<", b"{"):
        return " It starts like HTML/XML/JSON text (an error page or a metadata file saved under the model's name?)."
    if head.startswith(b"\x93NUMPY"):
        return " It is a NumPy .npy array."
    if head[:1] == b"\x08":  # field 1 (ir_version), varint: how every ONNX file starts
        return " It starts like an ONNX file, so it is probably truncated (an interrupted upload or download)."
    return ""


def load_model_proto(path: Path) -> onnx.ModelProto:
    """The model without its external weights (those stay on disk)."""
    return onnx.load(str(path), load_external_data=False)


def _read_proto(path: Path, report: ValidationReport) -> Optional[onnx.ModelProto]:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as err:
        report.error("file_unreadable", f"{path.name} cannot be read: {err.strerror or err}.",
                     "Check the file's permissions and that the download finished.")
        return None
    try:
        model = load_model_proto(path)
    except (DecodeError, ValueError, RuntimeError) as err:
        # Protobuf raises DecodeError for corrupt wire data; onnx.load may wrap it. The reason
        # goes into the report, which the flow turns into a ModelError: nothing is swallowed.
        report.error("not_onnx", f"{path.name} is not a valid ONNX model ({type(err).__name__}: "
                     f"{str(err)[:200]}).{_sniff(head)}", _REEXPORT_FIX)
        return None
    if not model.HasField("graph") or not model.graph.output or model.ir_version <= 0 or not model.opset_import:
        # Arbitrary bytes can decode as an (almost) empty ModelProto; a real one has all of these.
        what = [w for w, missing in (("graph", not model.HasField("graph")),
                                     ("graph outputs", not model.graph.output),
                                     ("IR version", model.ir_version <= 0),
                                     ("opset imports", not model.opset_import)) if missing]
        report.error("not_onnx", f"{path.name} is not a valid ONNX model: it has no {', no '.join(what)}."
                     f"{_sniff(head)}", _REEXPORT_FIX)
        return None
    return model


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto that can hold external data: initializers and attribute tensors, anywhere."""
    graphs = list(_graphs(model.graph))
    for f in model.functions:
        for node in f.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.extend(_graphs(attr.g))
    for g in graphs:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


