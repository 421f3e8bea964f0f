"""Turn a PyTorch or ONNX model into a pruned, quantized, evaluated, signed artifact.

Imported as ``edgectl.compress``.
"""
