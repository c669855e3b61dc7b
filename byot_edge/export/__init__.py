"""Export: truncated exits and cascade segments to ONNX and TensorRT, and the manifest.

Kept import-light (the runtime imports `byot_edge.manifest`); the parts:
- `exporter.export_checkpoint`: the one entry point (checkpoint -> checked files + manifest);
- `graph`: one ONNX capture of the network, cut into per-exit files and segments;
- `checks`: ONNX Runtime against PyTorch; `metadata`: what each ONNX file says about itself;
- `records`: manifest records and merging into an existing manifest; `staging`: temp files
  renamed only once everything passed;
- `quantize`, `calibration_set`: int8 ONNX files for ONNX Runtime (`--precision int8`) and
  the training images they are calibrated on;
- `trt_build`, `trt_env`, `engines`, `precision`: TensorRT engines (imported on demand).
"""
