"""Runtime: backends, exit policies, the anytime model and the HTTP server.

    from byot_edge.runtime import AnytimeModel
    model = AnytimeModel.load("deploy/manifest.json", backend="onnxruntime")
    model.predict(batch, threshold=0.9)

The runtime never imports `byot_edge.export`, `byot_edge.models` or torch: an edge device
installs it with one inference engine and nothing else (`pip install 'byot-edge[onnxruntime]'`),
and reads only the manifest (`byot_edge.manifest`). Inference libraries (onnxruntime,
tensorrt, cuda-python) are imported when a backend that needs them is created; the PyTorch
backend alone imports torch and the network definition, inside itself.
"""

from byot_edge.runtime.anytime import AnytimeModel, CascadeResult, Prediction, PredictOptions

__all__ = ["AnytimeModel", "CascadeResult", "PredictOptions", "Prediction"]
