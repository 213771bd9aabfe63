"""Walking an ONNX model's graphs: the main graph and every subgraph (If/Loop/Scan bodies), which
validation and adaptation both have to see (a weight or an op can hide in a Loop body)."""
from __future__ import annotations

from typing import Iterator

import onnx


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from graphs(g)
