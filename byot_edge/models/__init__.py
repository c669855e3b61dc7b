from byot_edge.models.multi_exit import (
    ExitInfo,
    ExitOutputs,
    ModelConfig,
    MultiExitNet,
    Section,
    Segment,
    TruncatedNet,
)
from byot_edge.models.registry import create_model, list_models, model_from_config, register_model

__all__ = [
    "ExitInfo",
    "ExitOutputs",
    "ModelConfig",
    "MultiExitNet",
    "Section",
    "Segment",
    "TruncatedNet",
    "create_model",
    "list_models",
    "model_from_config",
    "register_model",
]
