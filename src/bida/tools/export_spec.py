"""What ``bida export`` offers, without its heavy imports (the CLI's help reads it)."""

FORMATS = ("onnx", "pt2", "folder")
OUTPUTS = ("logits", "labels")
# ONNX opset of the exported graphs: 18 is what torch's exporter targets natively and what
# onnxruntime >= 1.14 runs (Resize with dynamic sizes, ReduceMean with axes as an input).
ONNX_OPSET = 18
