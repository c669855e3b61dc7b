"""byot-edge: self-distilled multi-exit networks, exported per exit, served as anytime models."""

import os

# Edge boxes and CI runners are small and shared: with OpenMP's default active waiting, a
# PyTorch thread that finds its core busy spins, and a training step ran 6-10x slower on a
# 2-core machine with one other busy process (measured: 16 vs 177 img/s). Passive waiting
# costs nothing measurable on an idle machine. Set before torch is imported; a user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from byot_edge.errors import ByotError

__version__ = "0.1.0"
__all__ = ["ByotError", "__version__"]
