"""`--pretrained`: a plain backbone's state dict, a byot-edge checkpoint, or the library's
ImageNet weights through its own cache (a local file here: no network in tests)."""

from __future__ import annotations

import importlib.util
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import make_checkpoint

from byot_edge.checkpoint import load_checkpoint
from byot_edge.errors import ByotError
from byot_edge.models import create_model
from byot_edge.models.pretrained import load_pretrained
from byot_edge.train import train
from byot_edge.train_config import config_from_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _saved(module: torch.nn.Module, path: Path) -> Path:
    torch.save(module.state_dict(), path)
    return path


def _assert_backbone_equals(net, state) -> None:
    ours = net.state_dict()
    assert net.source_keys
    for k, theirs in net.source_keys.items():
        assert torch.equal(ours[k], state[theirs]), k


@pytest.mark.parametrize(("arch", "plain", "kw"), [
    ("tv:resnet18", torchvision.models.resnet18, {}),
    ("tv:efficientnet_b0", torchvision.models.efficientnet_b0, {}),
    # the hand-cut ResNet takes torchvision's ResNet weights through its key map
    ("resnet18", torchvision.models.resnet18, {"stem": "imagenet"}),
    ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small, {"stem": "imagenet"}),
])
def test_a_plain_backbones_state_dict_round_trips(arch, plain, kw, tmp_path):
    torch.manual_seed(0)
    source = plain()
    with torch.no_grad():  # BN statistics that are not the defaults
        source.train()(torch.randn(4, 3, 64, 64))
    path = _saved(source, tmp_path / "plain.pt")
    net = create_model(arch, num_classes=5, input_size=64, **kw)
    branch_before = {k: v.clone() for k, v in net.heads[0].state_dict().items()}
    loaded = load_pretrained(net, str(path))
    assert loaded.loaded == len(net.source_keys)
    _assert_backbone_equals(net, source.state_dict())
    for k, v in net.heads[0].state_dict().items():  # the branches stay fresh
        assert torch.equal(v, branch_before[k])
    # and the backbone computes what the plain one computes up to its last stage
    source.eval(), net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = net.stem(x)
        for s in net.sections:
            h = s(h)
        if arch.endswith("resnet18"):
            want = torch.nn.Sequential(*list(source.children())[:-2])(x)
            torch.testing.assert_close(h, want, rtol=0, atol=0)


def test_weights_that_do_not_fit_are_refused_in_one_line(tmp_path):
    path = _saved(torchvision.models.resnet18(), tmp_path / "r18.pt")
    with pytest.raises(ByotError) as e:
        load_pretrained(create_model("tv:resnet34", num_classes=3), str(path))
    text = str(e.value)
    assert "\n" not in text
    assert "does not fit tv:resnet34" in text and "keys missing (layer1.2.conv1.weight" in text
    # the hand-cut ResNet's CIFAR stem is not torchvision's: the key is named with both shapes
    with pytest.raises(ByotError, match=r"conv1.weight \[64, 3, 7, 7\] vs \[64, 3, 3, 3\]"):
        load_pretrained(create_model("resnet18", num_classes=3), str(path))
    extra = torchvision.models.resnet18().state_dict() | {"layer5.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ByotError, match=r"1 keys this backbone does not have \(layer5.weight\)"):
        load_pretrained(create_model("tv:resnet18", num_classes=3), str(tmp_path / "extra.pt"))


@pytest.mark.parametrize("content", [b"", b"not a torch file", None])
def test_unreadable_or_absent_files_are_refused(tmp_path, content):
    path = tmp_path / "w.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ByotError, match="--pretrained"):
        load_pretrained(create_model("tv:resnet18", num_classes=3), str(path))


def test_rgb_weights_fold_into_a_grey_first_conv(tmp_path):
    source = torchvision.models.resnet18()
    path = _saved(source, tmp_path / "r18.pt")
    net = create_model("tv:resnet18", num_classes=3, in_chans=1, input_size=28)
    load_pretrained(net, str(path))
    first = net.state_dict()["stem.conv1.weight"]
    torch.testing.assert_close(first, source.conv1.weight.sum(1, keepdim=True))


def test_a_byot_checkpoint_gives_its_backbone_and_normalisation(tmp_path):
    ckpt = make_checkpoint(tmp_path / "src.pt", "resnet18", num_classes=6)
    src = load_checkpoint(ckpt)
    net = create_model("resnet18", num_classes=4, width=0.125)
    got = load_pretrained(net, str(ckpt))
    assert got.mean == (0.5, 0.5, 0.5) and got.std == (0.25, 0.25, 0.25)
    for k in net.source_keys:
        assert torch.equal(net.state_dict()[k], src["model"][k])
    with pytest.raises(ByotError, match="a byot-edge checkpoint of resnet18, not of resnet34"):
        load_pretrained(create_model("resnet34", num_classes=4, width=0.125), str(ckpt))


def test_imagenet_weights_come_from_torchvisions_cache(tmp_path, monkeypatch):
    """The download path, with the file already where torchvision's loader looks."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    source = torchvision.models.resnet18()
    _saved(source, cache / Path(weights.url).name)
    for arch, kw in (("tv:resnet18", {}), ("resnet18", {"stem": "imagenet"})):
        net = create_model(arch, num_classes=3, input_size=64, **kw)
        got = load_pretrained(net, "imagenet")
        _assert_backbone_equals(net, source.state_dict())
        assert got.mean == pytest.approx((0.485, 0.456, 0.406))
        assert got.std == pytest.approx((0.229, 0.224, 0.225))


def test_offline_imagenet_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(ByotError) as e:
        load_pretrained(create_model("tv:resnet18", num_classes=3), "imagenet")
    name = Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name
    assert "could not download" in str(e.value) and name in str(e.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(e.value)


def _hf_cache(root: Path, repo: str, state: dict) -> None:
    from safetensors.torch import save_file

    folder = root / ("models--" + repo.replace("/", "--"))
    sha = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(sha)
    (folder / "snapshots" / sha).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()},
              str(folder / "snapshots" / sha / "model.safetensors"))


def test_timm_imagenet_weights_come_from_the_hugging_face_cache(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    net = create_model("timm:resnet18d", num_classes=3, input_size=32)
    with pytest.raises(ByotError, match="HF_HUB_OFFLINE") as e:  # not cached yet
        load_pretrained(net, "imagenet")
    assert "\n" not in str(e.value)
    source = timm.create_model("resnet18d")
    _hf_cache(tmp_path / "hf", source.pretrained_cfg["hf_hub_id"], source.state_dict())
    got = load_pretrained(net, "imagenet")
    _assert_backbone_equals(net, source.state_dict())
    assert got.mean == pytest.approx((0.485, 0.456, 0.406))


def test_finetuning_trains_the_backbone_slower_and_can_hold_it(tmp_path):
    source = make_checkpoint(tmp_path / "src.pt", "resnet18", num_classes=10)
    before = load_checkpoint(source)["model"]
    seen = {}

    class Snapshot:
        def start_epoch(self, *args):
            pass

        def update(self, *args):
            pass

        def end_epoch(self, log):
            seen[log.epoch] = load_checkpoint(tmp_path / "run" / "last.pt")

    cfg = config_from_recipe("finetune", arch="resnet18", width=0.125, dataset="synthetic",
                             epochs=2, batch_size=32, max_train_samples=128,
                             freeze_backbone_epochs=1, pretrained=str(source),
                             out=str(tmp_path / "run"), device="cpu")
    assert cfg.backbone_lr == 0.1 and cfg.lr == 0.05
    train(cfg, reporter=Snapshot())
    first, second = seen[1], seen[2]
    stem = "stem.0.weight"
    assert torch.equal(first["model"][stem], before[stem])  # held in epoch 1
    assert not torch.equal(second["model"][stem], before[stem])  # learning in epoch 2
    assert not torch.equal(first["model"]["heads.0.fc.weight"], before["heads.0.fc.weight"])
    heads, backbone = second["optimizer"]["param_groups"]
    assert backbone["lr"] == pytest.approx(0.1 * heads["lr"])
    assert first["data"]["pretrained"] == str(source)


def test_imagenet_input_size_is_the_weights_crop():
    from byot_edge.models.pretrained import imagenet_input_size

    assert imagenet_input_size("tv:efficientnet_b0") == 224
    assert imagenet_input_size("resnet18") == 224
    if importlib.util.find_spec("timm"):
        assert imagenet_input_size("timm:mobilenetv4_conv_small") == 224
