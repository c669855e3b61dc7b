"""Runtime: backends, exit policies, the anytime model and the HTTP server.

    from byot_edge.runtime import AnytimeModel
    model = AnytimeModel.load("deploy/manifest.json", backend="onnxruntime")
    model.predict(batch, threshold=0.9)

Inference libraries (onnxruntime, torch, tensorrt, cuda-python) are imported only when a
backend that needs them is created.
"""

from byot_edge.runtime.anytime import AnytimeModel, CascadeResult, Prediction, PredictOptions

__all__ = ["AnytimeModel", "CascadeResult", "PredictOptions", "Prediction"]
