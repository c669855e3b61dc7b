from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from byot_edge.checkpoint import load_checkpoint, load_model
from byot_edge.datasets import dataset_info, load_arrays
from byot_edge.errors import ByotError
from byot_edge.evaluate import evaluate
from byot_edge.train import Diverged, train
from byot_edge.train_config import config_from_recipe


def _synthetic_cfg(out: Path, **kw):
    # 4 steps an epoch: what these tests check (resume, divergence, interrupted writes) needs
    # steps and epochs to exist, not to learn
    base = dict(arch="resnet18", dataset="synthetic", out=str(out), width=0.125, epochs=2,
                batch_size=64, max_train_samples=256, log_every=2, val_split=0.1)
    return config_from_recipe("quick", **{**base, **kw})


@pytest.mark.slow
def test_few_hundred_steps_on_real_data_beat_chance_at_every_exit(real_data, tmp_path):
    dataset, folder = real_data
    cfg = config_from_recipe("quick", arch="resnet18", dataset=dataset, data_dir=str(folder),
                             out=str(tmp_path / "run"), width=0.125, epochs=2, batch_size=32,
                             max_train_samples=4800, val_split=0.05, lr=0.05)
    run = train(cfg)  # 2 epochs x 150 steps
    model, state = load_model(run / "best.pt")
    test = load_arrays(dataset, folder, "test")
    sel = np.arange(min(2000, len(test.labels)))
    result = evaluate(model, test.subset(sel), dataset_info(dataset), split="test")
    accs = [r.top1 for r in result.rows]
    # chance is 10%; a wide margin on every exit and the ensemble
    floor = 0.6 if dataset == "fashion-mnist" else 0.25
    assert min(accs) > floor, accs
    assert state["metrics"]["val_source"] == "val"


class _StopAfterFirstEpoch:
    """A reporter that interrupts the run once epoch 1's checkpoint is written (a crash)."""

    def start_epoch(self, *args):
        pass

    def update(self, *args):
        pass

    def end_epoch(self, log):
        raise KeyboardInterrupt


def test_resume_continues_exactly(tmp_path):
    straight = train(_synthetic_cfg(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        train(_synthetic_cfg(tmp_path / "b"), reporter=_StopAfterFirstEpoch())
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    resumed = train(_synthetic_cfg(tmp_path / "b"), resume=tmp_path / "b" / "last.pt")
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
    assert a["metrics"] == b["metrics"]
    logs = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in logs] == [1, 2]


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import byot_edge.train as train_module

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(_synthetic_cfg(run), reporter=_StopAfterFirstEpoch())
    good = load_checkpoint(run / "last.pt")
    real_loss = train_module.multi_exit_loss

    def nan_loss(outputs, targets, cfg):
        loss, parts = real_loss(outputs, targets, cfg)
        return loss * float("nan"), parts

    monkeypatch.setattr(train_module, "multi_exit_loss", nan_loss)
    with pytest.raises(Diverged, match=r"diverged in epoch 2.*last\.pt \(epoch 1\)") as e:
        train(_synthetic_cfg(tmp_path / "run", epochs=2), resume=run / "last.pt")
    kept = load_checkpoint(run / "last.pt")
    assert kept["epoch"] == 1
    for k in good["model"]:
        torch.testing.assert_close(kept["model"][k], good["model"][k], rtol=0, atol=0)

    # The advice is a command that works as written once the cause is gone.
    import shlex

    from typer.testing import CliRunner

    from byot_edge.cli import app

    monkeypatch.undo()
    command = str(e.value).split("a lower learning rate: ")[1]
    args = shlex.split(command)
    assert args[:2] == ["byot-edge", "train"] and "--override" in args and "--lr" in args
    r = CliRunner().invoke(app, args[1:])
    assert r.exit_code == 0, r.output
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["train_config"]["lr"] == pytest.approx(0.01)


def test_killed_mid_checkpoint_resumes_with_one_metrics_line_per_epoch(tmp_path, monkeypatch):
    import byot_edge.train as train_module

    run = tmp_path / "run"
    real_save = train_module.save_checkpoint

    def killed_writing_last(path, state):
        if Path(path).name == "last.pt" and state["epoch"] == 2:
            raise KeyboardInterrupt  # as if killed while last.pt was being written
        return real_save(path, state)

    monkeypatch.setattr(train_module, "save_checkpoint", killed_writing_last)
    with pytest.raises(KeyboardInterrupt):
        train(_synthetic_cfg(run, epochs=3))
    monkeypatch.undo()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    # The metrics line comes before the checkpoints: epoch 2 is logged, last.pt is epoch 1.
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    # What a SIGKILL mid-write leaves behind (write_temp's names), and someone else's file.
    stale = [run / ".last.pt.k1ll3d_x.tmp", run / ".metrics.jsonl.abcdefgh.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    (run / "notes.tmp").write_text("mine")
    train(_synthetic_cfg(run, epochs=3), resume=run / "last.pt")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]  # epoch 2 redone once
    assert not any(p.exists() for p in stale) and (run / "notes.tmp").read_text() == "mine"
    assert not list(run.glob(".*.tmp"))


def test_dsn_and_plain_methods_train(tmp_path):
    for method in ("dsn", "plain"):
        run = train(_synthetic_cfg(tmp_path / method, method=method, epochs=1))
        assert load_checkpoint(run / "last.pt")["train_config"]["method"] == method


def test_paper_recipe_schedule():
    cfg = config_from_recipe("paper")
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.schedule) == (250, 128, 0.1, "multistep")
    assert cfg.milestones == pytest.approx((250 / 3, 500 / 3, 240))
    with pytest.raises(ByotError, match="quick"):
        config_from_recipe("fast")


def test_too_little_data_for_a_batch(tmp_path):
    with pytest.raises(ByotError, match="no full batch"):
        train(_synthetic_cfg(tmp_path / "x", max_train_samples=10))


def test_torchrun_ddp_on_cpu(tmp_path):
    import subprocess
    import sys

    from byot_edge.loadgen import free_port

    out = tmp_path / "ddp"
    # A port of its own: torchrun's default (29500) may be held by another run on the host.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()),
           "-m", "byot_edge.cli", "train", "--dataset", "synthetic", "--width", "0.125",
           "--epochs", "1", "--batch-size", "64", "--max-train-samples", "256", "--threads", "1",
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    # The ranks' own messages come before torchrun's traceback, which would fill a tail.
    said = [line for line in r.stderr.splitlines() if "error" in line.lower()
            and "torch/distributed" not in line]
    assert r.returncode == 0, "\n".join(said[:20]) + "\n" + r.stderr[-1500:]
    assert r.stdout.count("checkpoints:") == 1  # only rank 0 reports and writes
    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["train_config"]["batch_size"] == 64


def test_divergence_advice_is_below_the_recipes_lr_when_lr_was_raised(tmp_path, monkeypatch):
    # --lr 5 where the recipe says 0.1: a tenth of the run's (0.5) would diverge again; the
    # advice is a tenth of the recipe's. A run already below the recipe's goes lower still.
    import byot_edge.train as train_module

    real_step = train_module.training_step

    def nan_step(*args, **kwargs):
        return real_step(*args, **kwargs) * float("nan")

    monkeypatch.setattr(train_module, "training_step", nan_step)
    for lr, advice in ((5.0, "--lr 0.01"), (0.02, "--lr 0.002")):
        with pytest.raises(Diverged) as e:
            train(_synthetic_cfg(tmp_path / f"lr{lr}", lr=lr, epochs=1))
        message = str(e.value)
        assert message.endswith(f"({advice})"), message
        assert f"of --lr {lr:g}" in message and "the 'quick' recipe's is 0.1" in message


_DDP_RANK = """
import os, sys
import torch
torch.set_num_threads(1)
import byot_edge.train as train_module
from byot_edge.train_config import config_from_recipe

real_step = train_module.training_step

def step(*args, **kwargs):
    # Rank 1 alone sees a non-finite loss; the gradients stay finite (as when fp16's scaler
    # skips a step), so rank 0 alone would carry on into the next step's all-reduce.
    parts = real_step(*args, **kwargs)
    return parts * float("nan") if os.environ["RANK"] == "1" else parts

train_module.training_step = step
cfg = config_from_recipe("quick", arch="resnet18", dataset="synthetic", out=sys.argv[1],
                         width=0.125, epochs=1, batch_size=64, max_train_samples=256,
                         log_every=2, val_split=0.1)
try:
    train_module.train(cfg)
except train_module.Diverged as e:
    print("DIVERGED", e, flush=True)
    sys.exit(3)
"""


def test_ddp_divergence_on_one_rank_stops_every_rank(tmp_path):
    import os
    import subprocess
    import sys

    from byot_edge.loadgen import free_port

    script = tmp_path / "rank.py"
    script.write_text(_DDP_RANK)
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)  # a guard against the hang, not a timing
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank was still waiting 300 s after the other one had stopped")
        results.append((p.returncode, out, err))
    for rank, (code, out, err) in enumerate(results):
        assert code == 3, (rank, out, err[-2000:])
        assert "DIVERGED training diverged in epoch 1, step 2" in out, (rank, out)
