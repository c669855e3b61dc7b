"""Triton Python-backend model: one byot-edge cascade segment run with ONNX Runtime (written
by `byot-edge triton-repo --segments python`, for Triton builds without the ONNX Runtime
backend). The requests Triton's dynamic batcher hands over together run as one batch.
"""

import importlib
import os
import sys

# The Python backend's stub starts an isolated interpreter, which ignores PYTHONPATH: take
# it from the server's environment here, so it can say where byot-edge is installed.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]

# Triton's Python backend provides this module at run time (it is not on PyPI).
pb_utils = importlib.import_module("triton_python_backend_utils")


class TritonPythonModel:
    def initialize(self, args):
        from byot_edge.triton.segment import SegmentModel

        self.segment = SegmentModel.from_args(args, pb_utils)

    def execute(self, requests):
        return self.segment.execute(requests)
