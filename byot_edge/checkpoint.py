"""Checkpoints: what training writes and everything downstream reads.

A checkpoint is a dict of tensors and plain values (loadable with `weights_only=True`):
format/version, `model_config` (rebuilds the network), `data` (dataset name, input shape,
normalisation, class names), `train_config`, `epoch`, `model`, `optimizer`, `scheduler`,
`scaler`, `rng`, `metrics` (per-exit validation accuracy of that epoch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from byot_edge.errors import ByotError
from byot_edge.fileio import atomic_write
from byot_edge.models import MultiExitNet, model_from_config

CHECKPOINT_FORMAT = "byot-edge-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ByotError(f"checkpoint {path} does not exist; pass a file written by "
                        "`byot-edge train` (RUN_DIR/best.pt or RUN_DIR/last.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # junk raises anything from EOFError to KeyError inside pickle
        first = (str(e).splitlines() or [""])[0][:120]
        raise ByotError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first}); "
                        "it may be truncated or corrupt: use another checkpoint (last.pt / "
                        "best.pt) or train again") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ByotError(f"{path} is a PyTorch file but not a byot-edge checkpoint; "
                        "pass a file written by `byot-edge train`")
    version = state.get("version", 0)
    if not isinstance(version, int):
        raise ByotError(f"{path} has checkpoint version {version!r}, not a number this "
                        f"byot-edge reads (it writes {CHECKPOINT_VERSION}); pass a file written "
                        "by `byot-edge train`")
    if version > CHECKPOINT_VERSION:
        raise ByotError(f"{path} was written by a newer byot-edge (checkpoint version "
                        f"{version}); upgrade byot-edge to read it")
    for key in ("model_config", "model"):
        if not isinstance(state.get(key), dict):
            raise ByotError(f"{path} has no {key}, which every checkpoint `byot-edge train` "
                            "writes holds; use another checkpoint (last.pt / best.pt)")
    return state


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[MultiExitNet, dict[str, Any]]:
    """The trained network (in eval mode) and the checkpoint it came from."""
    state = load_checkpoint(path)
    model = model_from_config(state["model_config"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
