"""The self-distillation loss (BYOT) and the two baselines trained with the same network.

For each shallow exit i, with the deepest exit K as a detached teacher:
    (1 - alpha) * CE(z_i, y) + alpha * T^2 * KL(softmax(z_K / T) || softmax(z_i / T))
    + lambda * ||F_i - F_K||^2   (only for the exits in `feature_exits`)
and CE(z_K, y) for the deepest exit. `dsn` puts plain CE on every exit (deeply supervised
nets); `plain` trains the deepest exit alone (the shallow heads get no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from byot_edge.errors import ByotError
from byot_edge.models import ExitOutputs

METHODS = ("byot", "dsn", "plain")


@dataclass(frozen=True)
class LossConfig:
    method: str = "byot"
    alpha: float = 0.3
    temperature: float = 3.0
    feature_weight: float = 0.03
    feature_exits: tuple[int, ...] = (1, 2)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ByotError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if not 0 <= self.alpha <= 1:
            raise ByotError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ByotError(f"temperature must be > 0, got {self.temperature}")


def distillation_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch.

    The teacher is detached: the distillation terms never push the deepest exit.
    """
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher.detach() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def feature_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||F_i - F_K||^2 summed over feature dims, averaged over the batch (teacher detached)."""
    return (student - teacher.detach()).pow(2).sum(dim=1).mean()


def multi_exit_loss(
    outputs: ExitOutputs, targets: torch.Tensor, cfg: LossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and its named parts (detached), for logging."""
    logits = [z.float() for z in outputs.logits]
    deepest = logits[-1]
    ce_deep = F.cross_entropy(deepest, targets)
    zero = deepest.new_zeros(())
    if cfg.method == "plain":
        return ce_deep, {"ce": ce_deep.detach(), "kd": zero, "feat": zero}
    ce_shallow = torch.stack([F.cross_entropy(z, targets) for z in logits[:-1]]).sum()
    if cfg.method == "dsn":
        total = ce_deep + ce_shallow
        return total, {"ce": total.detach(), "kd": zero, "feat": zero}

    kd = torch.stack([distillation_kl(z, deepest, cfg.temperature) for z in logits[:-1]]).sum()
    feats = outputs.features
    feat_terms = [feature_distance(feats[i - 1].float(), feats[-1].float())
                  for i in cfg.feature_exits if i < len(feats)]
    feat = torch.stack(feat_terms).sum() if feat_terms else zero
    ce = ce_deep + (1 - cfg.alpha) * ce_shallow
    total = ce + cfg.alpha * kd + cfg.feature_weight * feat
    return total, {"ce": ce.detach(), "kd": kd.detach(), "feat": feat.detach()}
