"""Triton Python-backend model: the byot-edge anytime cascade (written by `byot-edge triton-repo`).

Mode "bls" runs the cascade over this repository's segment models through Business Logic
Scripting; mode "inprocess" runs AnytimeModel on the deploy folder beside this file. Either
way the cascade, its policies and the request parsing are byot-edge's own
(byot_edge.triton.cascade), so the Python the backend runs needs `byot-edge[onnxruntime]`.
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
        from byot_edge.triton.cascade import CascadeModel

        self.cascade = CascadeModel.from_args(args, pb_utils)

    def execute(self, requests):
        return self.cascade.execute(requests)

    def finalize(self):
        self.cascade.close()
