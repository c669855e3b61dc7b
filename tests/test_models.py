from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from byot_edge.errors import ByotError
from byot_edge.models import create_model, list_models, model_from_config
from byot_edge.models.branches import Attention

ARCHS = list_models()


def _model(arch: str, **kw):
    torch.manual_seed(0)
    kw = {"width": 0.125, "input_size": 32, **kw}
    return create_model(arch, num_classes=7, **kw).eval()


def test_registry_lists_resnets_and_a_mobilenet():
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"} <= set(ARCHS)
    assert any(a.startswith("mobilenet") for a in ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_truncate_and_segments_equal_forward(arch):
    model = _model(arch)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        # Perturb BN statistics so an identity BN cannot hide a wrong wiring.
        model.train()(torch.randn(8, 3, 32, 32))
        model.eval()
        full = model(x).logits
        assert len(full) == model.num_exits == 4
        for k in range(1, model.num_exits + 1):
            torch.testing.assert_close(model.truncate(k)(x), full[k - 1], rtol=0, atol=0)
        h = x
        for k, segment in enumerate(model.segments(), start=1):
            out = segment(h)
            if k < model.num_exits:
                h, z = out
            else:
                z = out
            torch.testing.assert_close(z, full[k - 1], rtol=0, atol=0)
        # A span skips the branches of the exits inside it and gives what the chain gives.
        sections = [x]
        for segment in model.segments()[:-1]:
            sections.append(segment(sections[-1])[0])
        for first in range(1, 5):
            for last in range(first, 5):
                out = model.span(first, last)(sections[first - 1])
                z = out if last == 4 else out[1]
                torch.testing.assert_close(z, full[last - 1], rtol=0, atol=0)
                if last < 4:
                    torch.testing.assert_close(out[0], sections[last], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2"])
def test_truncated_path_holds_only_what_exit_k_needs(arch):
    model = _model(arch)
    total = sum(p.numel() for p in model.parameters())
    exits = model.exits
    for info in exits:
        path = model.truncate(info.index)
        assert sum(p.numel() for p in path.parameters()) == info.params
        # no deeper section and no other exit's head
        assert len(path.sections) == info.index
    assert exits[-1].params < total  # the shallow branches are not part of the deepest path
    flops = [e.flops for e in exits]
    assert all(f > 0 for f in flops)
    # the deepest exit costs more than the first: the anytime premise
    assert flops[-1] > flops[0]


def test_exit_metadata_resnet18_cifar():
    model = _model("resnet18", width=1.0)
    exits = model.exits
    assert [e.index for e in exits] == [1, 2, 3, 4]
    assert [e.channels for e in exits] == [64, 128, 256, 512]
    assert [e.stride for e in exits] == [1, 2, 4, 8]
    # torchvision-counted FLOPs of the plain ResNet-18 CIFAR path are about 1.1 GFLOPs (0.56
    # GMACs); the deepest exit is exactly that path.
    assert 1.0e9 < exits[-1].flops < 1.2e9


def test_grayscale_and_odd_sizes():
    model = _model("resnet18", in_chans=1, input_size=28)
    out = model(torch.randn(2, 1, 28, 28))
    assert [z.shape for z in out.logits] == [torch.Size([2, 7])] * 4
    # every branch's feature matches the deepest feature's size (for the feature loss)
    assert len({f.shape for f in out.features}) == 1


@pytest.mark.parametrize("size", [32, 28, 7])
def test_attention_upsamples_to_the_section_size(size):
    # Even sizes take a constant x2 scale (for the exported graph): the same numbers as
    # upsampling to the section's size, which odd sizes still do.
    torch.manual_seed(0)
    attention = Attention(8).eval()
    x = torch.randn(2, 8, size, size)
    with torch.no_grad():
        a = torch.relu(attention.norm(attention.conv(x)))
        want = torch.sigmoid(F.interpolate(a, size=(size, size), mode="bilinear",
                                           align_corners=False)) * x
        torch.testing.assert_close(attention(x), want, rtol=0, atol=0)


def test_imagenet_stem():
    model = _model("resnet18", stem="imagenet", input_size=64)
    assert [e.stride for e in model.exits] == [4, 8, 16, 32]


def test_rebuild_from_config_round_trips():
    from dataclasses import asdict

    model = _model("mobilenet_v3_small")
    again = model_from_config(asdict(model.config))
    again.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again.eval()(x).logits[-1], model(x).logits[-1])


def test_bad_model_requests():
    with pytest.raises(ByotError, match=r"unknown architecture 'resnet9'.*resnet18"):
        create_model("resnet9", num_classes=10)
    with pytest.raises(ByotError, match=r"exits 1\.\.4"):
        _model("resnet18").truncate(5)
    with pytest.raises(ByotError, match=r"exits 1\.\.4"):
        _model("resnet18").truncate(0)
    with pytest.raises(ByotError, match="stem"):
        create_model("resnet18", num_classes=10, stem="tiny")


def test_a_taken_model_name_is_refused():
    from byot_edge.models import register_model

    def resnet18(**kwargs):  # the name of a builder already registered
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet18)
    assert create_model("resnet18", num_classes=10, width=0.125).num_exits == 4
