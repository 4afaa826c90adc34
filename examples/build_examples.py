"""Regenerates the bundled example models (needs the torch extra): python examples/build_examples.py"""

from pathlib import Path

from normfold.models.export import build_onnx

HERE = Path(__file__).parent

if __name__ == "__main__":
    build_onnx("resnet_like", seed=0, path=HERE / "resnet_like.onnx", exporter="dynamo")
    print(f"wrote {HERE / 'resnet_like.onnx'}")
