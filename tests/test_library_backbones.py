"""Library backbones (`tv:NAME`, `timm:NAME`) through the whole pipeline: cut, trained a
step, exported with segments (chained and joined into spans), answered by the runtime as
PyTorch answers; int8 and TensorRT builds of one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from byot_edge.checkpoint import load_model
from byot_edge.errors import ByotError
from byot_edge.export.exporter import export_checkpoint
from byot_edge.manifest import SEGMENT_ONNX, TRUNCATED_ONNX, TRUNCATED_TRT, load_manifest
from byot_edge.models import create_model
from byot_edge.models.library import library_names
from byot_edge.runtime.anytime import AnytimeModel
from byot_edge.runtime.backends.onnx_join import join_segments
from byot_edge.train import train
from byot_edge.train_config import config_from_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TV = ["tv:resnet50", "tv:mobilenet_v3_large", "tv:efficientnet_b0", "tv:regnet_y_400mf",
      "tv:convnext_tiny"]
TIMM = ["timm:mobilenetv4_conv_small", "timm:resnet18d"]
RTOL = 1e-4


def _needs(arch: str) -> None:
    if arch.startswith("timm:"):
        pytest.importorskip("timm")


@pytest.mark.parametrize("arch", TV + TIMM)
def test_trains_exports_and_serves(arch, tmp_path):
    _needs(arch)
    cfg = config_from_recipe("quick", arch=arch, dataset="synthetic", epochs=1, batch_size=8,
                             max_train_samples=16, out=str(tmp_path / "run"), device="cpu",
                             log_every=1)
    run = train(cfg)
    ckpt = run / "best.pt"
    model, _ = load_model(ckpt)
    k_max = model.num_exits
    assert k_max == 4 and [e.stride for e in model.exits] == [4, 8, 16, 32]

    _manifest, reports = export_checkpoint(ckpt, tmp_path / "deploy", segments=True,
                                          exporter="torchscript")
    assert all(r.passed for r in reports) and len(reports) == 2 * k_max

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = [z.numpy() for z in model(x).logits]
    # segments chain to every exit
    deployed = load_manifest(tmp_path / "deploy")
    h = x.numpy()
    for k in range(1, k_max + 1):
        session = ort.InferenceSession(str(deployed.file_path(k, SEGMENT_ONNX)),
                                       providers=["CPUExecutionProvider"])
        outs = session.run(None, {session.get_inputs()[0].name: h})
        err = np.abs(outs[-1] - ref[k - 1]).max() / np.abs(ref[k - 1]).max()
        assert err <= RTOL, f"segment {k} of {arch}: {err}"
        h = outs[0]
    # a span across exits that are off: segments 2..K joined, from section 1's output
    joined = join_segments([onnx.load(deployed.file_path(k, SEGMENT_ONNX))
                            for k in range(2, k_max + 1)])
    session = ort.InferenceSession(joined.SerializeToString(), providers=["CPUExecutionProvider"])
    first = ort.InferenceSession(str(deployed.file_path(1, SEGMENT_ONNX)),
                                 providers=["CPUExecutionProvider"])
    h1 = first.run(None, {first.get_inputs()[0].name: x.numpy()})[0]
    (span,) = session.run(None, {session.get_inputs()[0].name: h1})
    assert np.abs(span - ref[-1]).max() / np.abs(ref[-1]).max() <= RTOL
    runtime = AnytimeModel.load(tmp_path / "deploy" / "manifest.json", backend="onnxruntime",
                                threads=1)
    for k in range(1, k_max + 1):
        answers = runtime.predict(x.numpy(), exit=k)
        assert [a.index for a in answers] == ref[k - 1].argmax(1).tolist()


@pytest.mark.parametrize("arch", ["timm:efficientnet_b0", "timm:regnety_002",
                                  "tv:mobilenet_v2", "tv:resnext50_32x4d"])
def test_more_backbones_cut_at_every_halving(arch):
    _needs(arch)
    model = create_model(arch, num_classes=5, input_size=32)
    assert [e.stride for e in model.exits] == [4, 8, 16, 32]
    outs = model.eval()(torch.randn(2, 3, 32, 32))
    assert [tuple(z.shape) for z in outs.logits] == [(2, 5)] * 4


def test_deepest_exit_is_the_library_model():
    """With the net's weights, torchvision's own model gives the deepest exit's logits
    exactly: the head is the library's (pooling, classifier), the body runs in its order."""
    import torchvision

    net = create_model("tv:mobilenet_v3_large", num_classes=7, input_size=64).eval()
    plain = torchvision.models.mobilenet_v3_large(num_classes=7).eval()
    ours = net.state_dict()
    head = f"heads.{net.num_exits - 1}.model."
    weights = {theirs: ours[k] for k, theirs in net.source_keys.items()}
    weights |= {k: ours[head + k] for k in net.classifier_keys}
    plain.load_state_dict(weights)  # strict: every key of the plain model is covered
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x).logits[-1], plain(x), rtol=0, atol=0)


def test_exits_chooses_stage_ends():
    model = create_model("tv:resnet50", num_classes=3, input_size=32,
                         exits=["layer2", "layer4"])
    assert [e.stage for e in model.exits] == ["layer2", "layer4"]
    with pytest.raises(ByotError, match="choose from layer1,layer2,layer3,layer4"):
        create_model("tv:resnet50", num_classes=3, exits=["layer9", "layer4"])
    with pytest.raises(ByotError, match="end with the deepest, layer4"):
        create_model("tv:resnet50", num_classes=3, exits=["layer1", "layer2"])


@pytest.mark.parametrize(("arch", "message"), [
    ("tv:vit_b_16", "not one of torchvision's CNNs"),
    ("tv:nosuchnet", "not one of torchvision's CNNs"),
])
def test_unusable_names_get_one_line(arch, message):
    with pytest.raises(ByotError, match=message) as e:
        create_model(arch, num_classes=3)
    assert "\n" not in str(e.value)


def test_width_is_refused_for_library_backbones():
    with pytest.raises(ByotError, match="keep their own widths"):
        create_model("tv:resnet50", num_classes=3, width=0.5)


def test_a_non_cnn_timm_model_is_refused():
    pytest.importorskip("timm")
    with pytest.raises(ByotError, match="pick a CNN"):
        create_model("timm:vit_tiny_patch16_224", num_classes=3, input_size=32)


def test_grey_input_gets_a_first_conv_of_its_own():
    model = create_model("tv:efficientnet_b0", num_classes=3, in_chans=1, input_size=28)
    assert [tuple(z.shape) for z in model.eval()(torch.randn(2, 1, 28, 28)).logits] == \
        [(2, 3)] * 4


def test_the_listing_names_the_tested_families():
    names = library_names("tv")
    assert {"tv:resnet50", "tv:mobilenet_v3_large", "tv:efficientnet_b0", "tv:regnet_y_400mf",
            "tv:convnext_tiny"} <= set(names)
    assert not any("vit" in n or "swin" in n for n in names)


@pytest.fixture(scope="module")
def mobilenet_ckpt(tmp_path_factory):
    from conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("mbv3") / "best.pt", "tv:mobilenet_v3_large",
                           width=1.0)


def test_int8_export_of_a_library_backbone(mobilenet_ckpt, tmp_path):
    manifest, reports = export_checkpoint(
        mobilenet_ckpt, tmp_path / "deploy", exits=[2, 4], precision="int8",
        calibration_images=32, data_dir=tmp_path, dataset="synthetic", int8_agreement=0.3,
        exporter="torchscript")
    assert reports and all(r.passed for r in reports)
    assert manifest.exit(2).files[TRUNCATED_ONNX].precision == "int8"


def test_tensorrt_engine_build_of_a_library_backbone(mobilenet_ckpt, tmp_path):
    import importlib

    from byot_edge.export.trt_build import TrtOptions
    from byot_edge.export.trt_env import local_gpu

    module = next((m for m in ("tensorrt", "tensorrt_rtx")
                   if importlib.util.find_spec(m) is not None), None)
    gpu = local_gpu() if module else None
    if module is None or (module == "tensorrt" and gpu is None):
        pytest.skip("needs tensorrt with a GPU, or tensorrt-rtx (builds on a CPU)")
    options = TrtOptions(module=module, compute_capability=None if gpu else "8.9",
                         workspace_mb=256, batch_range=(1, 2, 4))
    manifest, _reports = export_checkpoint(mobilenet_ckpt, tmp_path / "deploy", exits=[2],
                                          formats=("trt",), trt_options=options,
                                          exporter="torchscript")
    assert manifest.file_path(2, TRUNCATED_TRT).is_file()


def test_without_timm_a_timm_name_gets_one_line_naming_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ByotError, match=r"pip install 'byot-edge\[timm\]'") as e:
        create_model("timm:resnet18d", num_classes=3)
    assert "\n" not in str(e.value)


def test_models_command_lists_the_libraries():
    from typer.testing import CliRunner

    from byot_edge.cli import app

    runner = CliRunner()
    listing = runner.invoke(app, ["models"])
    assert listing.exit_code == 0 and "resnet18" in listing.output and "tv:NAME" in listing.output
    tv = runner.invoke(app, ["models", "tv:regnet_y_4*"])
    assert tv.output.split() == ["tv:regnet_y_400mf"]
    one = runner.invoke(app, ["models", "tv:resnet50"])
    assert one.exit_code == 0 and "layer3" in one.output
    none = runner.invoke(app, ["models", "tv:nothing*"])
    assert none.exit_code == 2 and "no tv architecture matches" in none.output
