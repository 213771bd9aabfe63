"""Export a random-weight torchvision ResNet-50 to ONNX for bench/int8_resnet.py (not run by CI).

Runs with an interpreter that has torch and torchvision (on the lent H100: the machine's own
``python3``), not with the TensorRT interpreter::

    python3 bench/export_resnet.py --out /tmp/bench/resnet50.onnx

The model: ``images`` float32 [N,3,224,224] -> ``logits`` [N,1000], opset 17, dynamic batch, the
legacy TorchScript exporter (``dynamo=False``), IR version capped at 8 for TensorRT 8.6's parser.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def export_resnet50(out: Path, opset: int = 17, seed: int = 0) -> Path:
    """Write the ONNX file and return its path."""
    import onnx
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None).eval()
    dummy = torch.randn(1, 3, 224, 224)
    out.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(opset_version=opset, input_names=["images"], output_names=["logits"], do_constant_folding=True,
                  dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}})
    with torch.no_grad():
        try:
            torch.onnx.export(model, (dummy,), str(out), dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5 has no dynamo argument (and exports this way anyway)
            torch.onnx.export(model, (dummy,), str(out), **kwargs)
    proto = onnx.load(str(out))
    if proto.ir_version > 8:  # TensorRT 8.6's parser reads IR <= 8
        proto.ir_version = 8
        onnx.save(proto, str(out))
    onnx.checker.check_model(str(out))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench/resnet50.onnx"))
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    path = export_resnet50(args.out, args.opset)
    sys.stdout.write(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
