"""NVIDIA Triton Inference Server: the model repository `byot-edge triton-repo` writes, and
the code its Python-backend models run (the cascade over BLS or in-process, ONNX segments).

Nothing here imports Triton: the Python backend hands its `triton_python_backend_utils`
module to the models, which pass it on.
"""
