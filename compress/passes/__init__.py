"""The compression passes: each turns one ONNX model into another, with a typed config."""
