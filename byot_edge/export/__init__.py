"""Export: truncated exits and cascade segments to ONNX and TensorRT, and the manifest."""
