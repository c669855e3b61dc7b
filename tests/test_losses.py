from __future__ import annotations

import math

import pytest
import torch

from byot_edge.errors import ByotError
from byot_edge.losses import LossConfig, distillation_kl, feature_distance, multi_exit_loss
from byot_edge.models import ExitOutputs


def test_kl_direction_and_temperature_square_by_hand():
    student = torch.tensor([[1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    t = 2.0
    p = torch.softmax(teacher / t, 1)[0].tolist()  # teacher distribution
    q = torch.softmax(student / t, 1)[0].tolist()
    expected = t * t * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert distillation_kl(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)
    reverse = t * t * sum(qi * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))
    assert abs(expected - reverse) > 1e-3  # the test can tell the two directions apart


def test_feature_distance_by_hand():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert feature_distance(a, b).item() == pytest.approx((5 + 25) / 2)


def _outputs(requires_grad=True):
    torch.manual_seed(0)
    logits = [torch.randn(4, 3, requires_grad=requires_grad) for _ in range(3)]
    feats = [torch.randn(4, 5, requires_grad=requires_grad) for _ in range(3)]
    return ExitOutputs(logits, feats), torch.tensor([0, 1, 2, 1])


def test_byot_total_by_hand():
    out, y = _outputs()
    cfg = LossConfig(alpha=0.3, temperature=3.0, feature_weight=0.03, feature_exits=(1, 2))
    total, parts = multi_exit_loss(out, y, cfg)
    ce = torch.nn.functional.cross_entropy
    z, f = out.logits, out.features
    expected = ce(z[2], y)
    for i in range(2):
        expected = expected + 0.7 * ce(z[i], y) + 0.3 * distillation_kl(z[i], z[2], 3.0)
        expected = expected + 0.03 * ((f[i] - f[2]) ** 2).sum(1).mean()
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"ce", "kd", "feat"}


def test_no_gradient_from_distillation_into_the_teacher():
    out, y = _outputs()
    cfg = LossConfig(alpha=1.0, feature_weight=1.0)  # only KD + feature terms on shallow exits
    total, _ = multi_exit_loss(out, y, cfg)
    total.backward()
    # the teacher's logits get gradient only from their own CE term
    teacher = out.logits[-1].detach().requires_grad_()
    torch.nn.functional.cross_entropy(teacher, y).backward()
    torch.testing.assert_close(out.logits[-1].grad, teacher.grad)
    assert out.features[-1].grad is None or out.features[-1].grad.abs().sum() == 0
    assert out.logits[0].grad.abs().sum() > 0  # the students do learn


def test_dsn_and_plain():
    out, y = _outputs()
    ce = torch.nn.functional.cross_entropy
    dsn, _ = multi_exit_loss(out, y, LossConfig(method="dsn"))
    torch.testing.assert_close(dsn, sum(ce(z, y) for z in out.logits))
    plain, _ = multi_exit_loss(out, y, LossConfig(method="plain"))
    plain.backward()
    torch.testing.assert_close(plain, ce(out.logits[-1], y))
    assert out.logits[0].grad is None


def test_bad_loss_config():
    with pytest.raises(ByotError, match="byot, dsn, plain"):
        LossConfig(method="kd")
    with pytest.raises(ByotError):
        LossConfig(alpha=1.5)
