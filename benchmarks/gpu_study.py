"""The study behind benchmarks/gpu_study.sh: throughput, accuracy, runtime, then summary.md.

    bash benchmarks/gpu_study.sh             # on the GPU machine (stages data, then runs this)
    TINY=1 bash benchmarks/gpu_study.sh      # the CPU smoke test of every part

1. throughput: benchmarks/train_throughput.py --variants study --flops (img/s, TFLOP/s, and
   their share of the H200's bf16 peak; byot/plain step time).
2. accuracy: `byot-edge train` byot, plain and dsn on the same schedule, then `byot-edge eval
   --json` on the test set: per exit and ensemble top-1. Epochs come down (never up) to fit
   --time-budget-s, estimated from part 1's img/s.
3. runtime: `byot-edge export --segments`, `eval --split val --save-logits`, `calibrate`, then
   the torch backend through `AnytimeModel` per exit and as the calibrated cascade at
   batch 1 and 32, timed with CUDA events (wall clock on a CPU).

Every part runs in this one process (the CLI commands too, called in-process: a fresh
interpreter costs ~10 s of imports on a small CPU) and writes its JSON into --out as soon as
it has something, so a run stopped half way keeps what it finished; summary.md is rebuilt
from those JSON files after every part. The runtime part runs right after the byot model is
trained, before plain and dsn, so an accuracy part that overruns costs the baselines only.
A part that fails records its error in its JSON and the others still run; the exit status
is then 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import byot_edge  # noqa: F401  (OpenMP wait policy; gpu_study.sh also exports it)
from byot_edge.timing import Timed, interleave, summarize

# Dense bf16 matrix rate of the lent H200 as measured there (8192^3 bf16 matmul: about
# 790 TFLOP/s on random data; the datasheet's 990 is not reached): the ceiling that achieved
# training TFLOP/s is compared with. On other machines the share is only indicative.
H200_BF16_PEAK_TFLOPS = 790.0
# The accuracy part trains at batch 128 with a validation pass and two checkpoints per epoch;
# the throughput part times bare batch-256 steps. Epochs are planned with this margin.
EPOCH_TIME_MARGIN = 1.6
RUN_OVERHEAD_S = 15.0  # per training run besides its epochs: data, model, test eval (GPU)
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "synthetic": 2_000}
METHODS = ("byot", "plain", "dsn")  # byot first: the runtime part needs its checkpoint
T0 = time.time()  # replaced by --t0, the shell script's start


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically, so a run killed mid-write leaves the previous version."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cli(*args: str | Path) -> None:
    """`byot-edge ARGS` in this process: the public commands, no second torch import."""
    from typer.main import get_command

    from byot_edge.cli import app

    argv = [str(a) for a in args]
    log("byot-edge " + " ".join(argv))
    code = get_command(app).main(argv, prog_name="byot-edge", standalone_mode=False)
    if code not in (None, 0):
        raise RuntimeError(f"byot-edge {argv[0]} exited with status {code} (message above)")


def data_args(args: argparse.Namespace) -> list[str]:
    return ["--data-dir", args.data_dir] if args.data_dir else []


# -- 1. throughput ----------------------------------------------------------------------


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_throughput  # the benchmark itself, not a copy of its logic

    argv = ["--device", args.device, "--arch", "resnet18", "--width", str(args.tp_width),
            "--size", str(args.tp_size), "--batch", str(args.tp_batch),
            "--steps", str(args.tp_steps), "--warmup", str(args.tp_warmup),
            "--rounds", str(args.tp_rounds), "--variants", "study", "--amp", args.tp_amp,
            "--flops"]
    if not args.compile:
        argv.append("--no-compile")
    log("train_throughput.py " + " ".join(argv))
    r = train_throughput.main(argv)
    r["peak_tflops"] = H200_BF16_PEAK_TFLOPS
    r["peak_share"] = {k: v / H200_BF16_PEAK_TFLOPS for k, v in r["tflops"].items()}
    r["step_ms"] = {k: 1e3 * args.tp_batch / v for k, v in r["images_per_s"].items()}
    notes = [] if args.compile else ["torch.compile left out (COMPILE=0, or TINY on a CPU)"]
    notes += [f"{k} failed and is left out: {e[:200]}" for k, e in r.get("failed", {}).items()]
    if notes:
        r["note"] = "; ".join(notes)
    return r


# -- 2. accuracy ------------------------------------------------------------------------


def plan_epochs(args: argparse.Namespace, tp: dict[str, Any] | None) -> dict[str, Any]:
    """EPOCHS, or fewer where part 1's img/s says the runs would not fit the time budget."""
    n_runs = len(args.methods) * len(args.seeds)
    plan: dict[str, Any] = {"requested": args.epochs, "epochs": args.epochs,
                            "budget_s": args.time_budget_s, "runs": n_runs}
    if args.time_budget_s <= 0:
        return plan | {"reason": "no time budget: EPOCHS as given"}
    if not tp or "images_per_s" not in tp:
        return plan | {"reason": "no throughput figures: EPOCHS as given"}
    ips = tp["images_per_s"]
    n = TRAIN_IMAGES.get(args.dataset, 50_000) * (1 - args.val_split)
    if args.max_train_samples:
        n = min(n, args.max_train_samples)
    # the study's "amp + channels-last" variants are the training runs' settings
    per_epoch = {m: EPOCH_TIME_MARGIN * n / ips.get(f"{m} + amp + channels-last", ips[m])
                 for m in args.methods}
    epoch_all = sum(per_epoch.values()) * len(args.seeds)
    left = (args.time_budget_s - (time.time() - T0) - args.runtime_reserve_s
            - n_runs * RUN_OVERHEAD_S)
    fits = math.floor(left / epoch_all) if left > 0 else 0
    epochs = max(1, min(args.epochs, fits))
    return plan | {"epochs": epochs, "fits": fits, "left_s": round(left, 1),
                   "per_epoch_s": {m: round(v, 2) for m, v in per_epoch.items()},
                   "estimated_s": round(epochs * epoch_all + n_runs * RUN_OVERHEAD_S, 1),
                   "reason": ("EPOCHS fits the budget" if epochs == args.epochs else
                              f"scaled down from {args.epochs} to fit {args.time_budget_s:.0f}s")}


def train_and_eval(args: argparse.Namespace, method: str, seed: int,
                   epochs: int) -> dict[str, Any]:
    run = Path(args.work) / f"{method}-seed{seed}"
    metrics = run / "metrics.jsonl"
    t = time.perf_counter()
    done = metrics.is_file() and len(metrics.read_text().splitlines()) == epochs
    if not done:  # a run finished with these epochs is reused; anything else starts over
        shutil.rmtree(run, ignore_errors=True)
        cli("train", "--arch", "resnet18", "--dataset", args.dataset, *data_args(args),
            "--recipe", args.recipe, "--epochs", str(epochs), "--method", method,
            "--seed", str(seed), "--width", str(args.width), "--val-split", str(args.val_split),
            "--device", args.device, "--amp", "auto", "--channels-last", "--out", run,
            *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
            *(["--max-train-samples", str(args.max_train_samples)]
              if args.max_train_samples else []),
            *(["--threads", str(args.threads)] if args.threads else []))
    train_s = time.perf_counter() - t
    cli("eval", run / "last.pt", *data_args(args), "--device", args.device,
        "--json", run / "test_eval.json")
    ev = json.loads((run / "test_eval.json").read_text())
    logs = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"method": method, "seed": seed, "epochs": len(logs), "train_s": round(train_s, 1),
            "run_s": round(time.perf_counter() - t, 1),  # train + test eval
            "epoch_s": [round(e["seconds"], 2) for e in logs],
            "images_per_s": statistics.median(e["images_per_s"] for e in logs),
            "val_top1": logs[-1]["val_accuracy"], "test_samples": ev["samples"],
            "names": [e["name"] for e in ev["exits"]], "top1": [e["top1"] for e in ev["exits"]],
            "flops": [e["flops"] for e in ev["exits"]], "checkpoint": str(run / "last.pt")}


def accuracy(args: argparse.Namespace, state: dict[str, Any],
             runs: list[tuple[str, int]]) -> None:
    path = Path(args.out) / "accuracy.json"
    for method, seed in runs:
        done = [r["run_s"] for r in state["runs"] if "run_s" in r]
        late = time.time() - T0 + (max(done) if done else 0.0)
        if args.time_budget_s > 0 and done and late > args.time_budget_s + args.grace_s:
            # a run the device's time limit would kill half way: skip it, keep the summary
            log(f"accuracy: {method} seed {seed} SKIPPED: would end at {late:.0f}s")
            state["runs"].append({"method": method, "seed": seed, "skipped":
                                  f"would end at {late:.0f}s, past the budget "
                                  f"{args.time_budget_s:.0f}s + {args.grace_s:.0f}s"})
        else:
            log(f"accuracy: {method} seed {seed}, {state['plan']['epochs']} epochs")
            try:
                state["runs"].append(train_and_eval(args, method, seed,
                                                    state["plan"]["epochs"]))
            except Exception as e:  # one failed run must not cost the others
                log(f"accuracy: {method} seed {seed} FAILED: {e!r}")
                traceback.print_exc()
                state["runs"].append({"method": method, "seed": seed, "error": repr(e)})
        state["summary"] = summarise_runs(state["runs"])
        write_json(path, state)


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        ok = [r for r in runs if r["method"] == method and "top1" in r]
        if not ok:
            continue
        cols = list(zip(*(r["top1"] for r in ok), strict=True))
        summary[method] = {"names": ok[0]["names"], "seeds": [r["seed"] for r in ok],
                           "mean": [statistics.mean(c) for c in cols],
                           "std": [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols],
                           "train_s": statistics.mean(r["train_s"] for r in ok),
                           "images_per_s": statistics.mean(r["images_per_s"] for r in ok)}
    return summary


# -- 3. runtime -------------------------------------------------------------------------


def test_images(args: argparse.Namespace, manifest: dict[str, Any],
                n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Normalised test images as the manifest file describes them (read as plain JSON)."""
    spec = manifest["input"]
    mean = np.asarray(spec["mean"], np.float32)[:, None, None]
    std = np.asarray(spec["std"], np.float32)[:, None, None]
    batch = Path(args.data_dir or ".") / "cifar-10-batches-py" / "test_batch"
    if args.dataset == "cifar10" and batch.is_file():
        from byot_edge.datasets import read_cifar_batch  # refuses pickles that run code

        d = read_cifar_batch(batch)
        x = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32)[:n]
        y = np.asarray(d["labels"], np.int64)[:n]
        source = "CIFAR-10 (JPEG q75) test images"
    else:  # synthetic runs have no files: random pixels time the same, their top-1 is noise
        g = np.random.default_rng(0)
        x = g.integers(0, 256, (n, *spec["shape"]), dtype=np.uint8)
        y = g.integers(0, len(manifest["class_names"]), n)
        source = "random pixels (synthetic dataset: top-1 is meaningless)"
    return ((x / 255.0 - mean) / std).astype(np.float32), y, source


@dataclass(frozen=True)
class _Call:
    """One timed call of a runtime mode: its answer, the true labels, its CUDA-event ms."""

    result: Any
    labels: np.ndarray
    cuda_ms: float | None


def _mode_call(run: Callable[[np.ndarray], Any], images: np.ndarray, labels: np.ndarray,
               batch: int, cuda: bool) -> Callable[[], _Call]:
    """A call of `run` on the next `batch` test images (consecutive, wrapping round). On CUDA
    it brackets the run with events and waits for the last, so the harness's wall clock
    ends after the GPU has."""
    calls = itertools.count()

    def call() -> _Call:
        lo = next(calls) * batch % (len(images) - batch + 1)
        x, y = images[lo:lo + batch], labels[lo:lo + batch]
        if not cuda:
            return _Call(run(x), y, None)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        result = run(x)
        end.record()
        end.synchronize()
        return _Call(result, y, begin.elapsed_time(end))

    return call


def _stats(ms: list[float]) -> dict[str, float]:
    s = summarize(ms)
    return {"median": s.p50, "p90": s.p90, "mean": s.mean}


def _mode_row(name: str, batch: int, timed: Timed[_Call], num_exits: int) -> dict[str, Any]:
    calls = timed.results
    cuda_ms = [c.cuda_ms for c in calls if c.cuda_ms is not None]
    st = _stats(cuda_ms or timed.ms)
    samples = batch * len(calls)
    exits = sum(np.bincount(c.result.exits, minlength=num_exits + 1)[:num_exits + 1]
                for c in calls)
    return {"mode": name, "batch": batch, "calls": len(calls),
            "timer": "cuda events" if cuda_ms else "wall clock",
            "ms": st, "wall_ms": _stats(timed.ms), "images_per_s": batch * 1e3 / st["mean"],
            "top1": sum(int((np.asarray(c.result.indices) == c.labels).sum())
                        for c in calls) / samples,
            "exit_share": (exits[1:] / samples).tolist()}


def runtime(args: argparse.Namespace, checkpoint: Path) -> dict[str, Any]:
    from byot_edge.runtime import AnytimeModel, PredictOptions

    work, out = Path(args.work), Path(args.out)
    deploy, logits = work / "deploy", work / "val_logits.npz"
    shutil.rmtree(deploy, ignore_errors=True)
    cli("export", checkpoint, "--out", deploy, "--segments", *data_args(args),
        *(["--exporter", args.exporter] if args.exporter != "auto" else []))
    cli("eval", checkpoint, "--split", "val", "--save-logits", logits, *data_args(args),
        "--device", args.device)
    cli("calibrate", deploy / "manifest.json", "--logits", logits,
        "--max-drop", str(args.max_drop), "--plot", out / "calibration.png")
    manifest = json.loads((deploy / "manifest.json").read_text())
    num_exits = len(manifest["exits"])
    images, labels, source = test_images(args, manifest, args.rt_images)
    cuda = args.device.startswith("cuda")
    model = AnytimeModel.load(deploy / "manifest.json", backend="torch", device=args.device)
    modes: dict[str, Callable[[np.ndarray], Any]] = {
        f"exit {k}": (lambda x, k=k: model.run(x, PredictOptions(exit=k)))
        for k in range(1, num_exits + 1)}
    modes["cascade"] = model.run  # the manifest's calibrated thresholds

    rows = []
    for batch, calls in ((1, args.rt_calls_b1), (32, args.rt_calls_b32)):
        model.warmup(batch)
        # 3 untimed calls first (they allocate and pick kernels), then the modes take turns
        # of `calls` calls, --rt-rounds each, so drift hits them alike
        timed = interleave({name: _mode_call(run, images, labels, batch, cuda)
                            for name, run in modes.items()},
                           warmup=3, runs=args.rt_rounds * calls, block=calls,
                           max_seconds=math.inf)
        rows += [_mode_row(name, batch, t, num_exits) for name, t in timed.items()]
        log(f"runtime batch {batch}: " + ", ".join(
            f"{r['mode']} {r['ms']['median']:.3f} ms" for r in rows if r["batch"] == batch))
    model.close()
    thresholds = manifest.get("thresholds") or {}
    return {"backend": "torch", "device": args.device,
            "device_name": (torch.cuda.get_device_name() if cuda else "cpu"),
            "torch": torch.__version__, "images": source, "num_exits": num_exits,
            "exit_flops": [e["flops"] for e in manifest["exits"]],
            "thresholds": thresholds.get("values"), "criterion": thresholds.get("criterion"),
            "max_drop": args.max_drop, "checkpoint": str(checkpoint),
            "note": ("CUDA events bracket AnytimeModel.run, host<->device copies included"
                     if cuda else "wall clock around AnytimeModel.run"),
            "rows": rows}


# -- 4. summary -------------------------------------------------------------------------


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def summary(out: Path, tiny: bool) -> str:
    """summary.md from the JSON files in `out` (whatever parts have finished)."""
    tp, acc, rt = (read_json(out / f"{p}.json") for p in ("throughput", "accuracy", "runtime"))
    lines = ["# GPU study: byot-edge", ""]
    if tiny:
        lines += ["**TINY mode** (CPU smoke test): the figures only show the code ran.", ""]
    errors: list[str] = []
    lines += ["## 1. Training throughput", ""]
    if tp and "images_per_s" in tp:
        c = tp["config"]
        lines += [f"{c['arch']} x{c['width']} at {c['size']}x{c['size']}, batch {c['batch']}, "
                  f"on {tp['device']}, torch {tp['torch']}; median of {c['rounds']} rounds of "
                  f"{c['steps']} steps. FLOPs of one training step (forward + backward) counted "
                  f"with torch.utils.flop_counter; peak: {tp['peak_tflops']:.0f} TFLOP/s "
                  "(H200 dense bf16, measured).", "",
                  "| variant | img/s | step ms | GFLOP/step | TFLOP/s | % of bf16 peak |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for k, ips in tp["images_per_s"].items():
            lines.append(f"| {k} | {ips:,.0f} | {tp['step_ms'][k]:.2f} | "
                         f"{tp['flops_per_step'][k] / 1e9:.4g} | {tp['tflops'][k]:.4g} | "
                         f"{100 * tp['peak_share'][k]:.3g} |")
        lines += ["", "byot step time / plain step time: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in tp["byot_over_plain_step_time"].items())
            + f"; backbone-only step / byot step: {tp['branches_overhead']:.2f}x", ""]
        if tp.get("note"):
            lines += [f"Note: {tp['note']}.", ""]
    if tp and "error" in tp:
        errors.append(f"throughput: {tp['error']}")
    lines += ["## 2. Accuracy: test top-1 (%) per exit and ensemble", ""]
    if acc and acc.get("summary"):
        cfg, plan = acc["config"], acc["plan"]
        names = next(iter(acc["summary"].values()))["names"]
        lines += [f"{cfg['dataset_label']}, ResNet-18 x{cfg['width']}, {plan['epochs']} epochs "
                  f"of recipe {cfg['recipe']}, batch {cfg['batch_size'] or 'of the recipe'}, "
                  f"val split {cfg['val_split']}, seeds {cfg['seeds']} (mean ± std over "
                  f"seeds); last checkpoint. Epoch plan: {plan['reason']}.", "",
                  "| method | " + " | ".join(names) + " | train s | train img/s |",
                  "| --- |" + " ---: |" * (len(names) + 2)]
        for method, s in acc["summary"].items():
            cells = [f"{_pct(m)} ± {_pct(d)}" if len(s["seeds"]) > 1 else _pct(m)
                     for m, d in zip(s["mean"], s["std"], strict=True)]
            lines.append(f"| {method} | " + " | ".join(cells)
                         + f" | {s['train_s']:.0f} | {s['images_per_s']:,.0f} |")
        lines.append("")
    for r in (acc or {}).get("runs", []):
        for what in ("error", "skipped"):
            if what in r:
                errors.append(f"accuracy {r['method']} seed {r['seed']} {what}: {r[what]}")
    if acc and "error" in acc:
        errors.append(f"accuracy: {acc['error']}")
    lines += ["## 3. Runtime: torch backend, per exit and the calibrated cascade", ""]
    if rt and "rows" in rt:
        thr = " ".join("off" if t > 1 else f"{t:.3f}" for t in rt["thresholds"] or [])
        lines += [f"`AnytimeModel.load(manifest, backend=\"torch\", device=\"{rt['device']}\")` "
                  f"on {rt['device_name']}, torch {rt['torch']}; inputs: {rt['images']}. "
                  f"Thresholds ({rt['criterion']}, max drop {rt['max_drop']} points on val): "
                  f"{thr or '-'}. {rt['note']}.", "",
                  "| path | batch | timer | median ms | p90 ms | img/s | top-1 % | "
                  "answered at exits (%) |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
        for r in rt["rows"]:
            share = " / ".join(f"{100 * s:.0f}" for s in r["exit_share"])
            lines.append(f"| {r['mode']} | {r['batch']} | {r['timer']} | "
                         f"{r['ms']['median']:.3f} | {r['ms']['p90']:.3f} | "
                         f"{r['images_per_s']:,.0f} | {_pct(r['top1'])} | {share} |")
        lines.append("")
        deepest = f"exit {rt['num_exits']}"
        for b in sorted({r["batch"] for r in rt["rows"]}):
            ms = {r["mode"]: r["ms"]["median"] for r in rt["rows"] if r["batch"] == b}
            if "cascade" in ms and deepest in ms:
                lines.append(f"- batch {b}: cascade {ms['cascade']:.3f} ms vs {deepest} alone "
                             f"{ms[deepest]:.3f} ms (speed-up {ms[deepest] / ms['cascade']:.2f}x)")
        lines.append("")
    if rt and "error" in rt:
        errors.append(f"runtime: {rt['error']}")
    if errors:
        lines += ["## Errors", "", *(f"- {e}" for e in errors), ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


# -- main -------------------------------------------------------------------------------


def part(name: str, out: Path, fn: Callable[[], dict[str, Any] | None], tiny: bool) -> bool:
    """Runs one part; its JSON gets the result, or the error. False when it failed."""
    log(f"== {name}")
    ok = True
    try:
        result = fn()
        if result is not None:
            write_json(out / f"{name}.json", result)
    except Exception as e:
        log(f"{name} FAILED: {e!r}")
        traceback.print_exc()
        write_json(out / f"{name}.json", {**(read_json(out / f"{name}.json") or {}),
                                          "error": repr(e)})
        ok = False
    summary(out, tiny)
    log(f"== {name} done; wrote {out / 'summary.md'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    global T0
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu_study", help="JSON, summary.md, plot")
    p.add_argument("--work", default="runs/gpu_study_work", help="checkpoints, exports")
    p.add_argument("--parts", default="throughput,accuracy,runtime")
    p.add_argument("--tiny", action="store_true", help="label the summary as a smoke test")
    p.add_argument("--t0", type=float, default=None, help="start time (epoch s) of the budget")
    p.add_argument("--time-budget-s", type=float, default=0.0, help="0: EPOCHS as given")
    p.add_argument("--runtime-reserve-s", type=float, default=90.0,
                   help="kept free of training for the runtime part")
    p.add_argument("--grace-s", type=float, default=60.0,
                   help="a training run that would end later than budget + this is skipped")
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=None)
    # 1. throughput
    p.add_argument("--tp-width", type=float, default=1.0)
    p.add_argument("--tp-size", type=int, default=32)
    p.add_argument("--tp-batch", type=int, default=256)
    p.add_argument("--tp-steps", type=int, default=20)
    p.add_argument("--tp-warmup", type=int, default=5)
    p.add_argument("--tp-rounds", type=int, default=3)
    p.add_argument("--tp-amp", default="auto")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    # 2. accuracy
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--recipe", default="quick")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--val-split", type=float, default=0.1)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    # 3. runtime
    p.add_argument("--exporter", default="auto")
    p.add_argument("--max-drop", type=float, default=0.5)
    p.add_argument("--rt-images", type=int, default=10_000)
    p.add_argument("--rt-calls-b1", type=int, default=100, help="timed calls per round")
    p.add_argument("--rt-calls-b32", type=int, default=30, help="timed calls per round")
    p.add_argument("--rt-rounds", type=int, default=3)
    args = p.parse_args(argv)
    T0 = args.t0 or T0
    if args.threads:
        torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    log(f"gpu study: out {out}, work {work}, parts {sorted(parts)}, device {args.device}, "
        f"torch {torch.__version__}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else ""))
    ok = True
    if "throughput" in parts:
        ok &= part("throughput", out, lambda: throughput(args), args.tiny)

    methods = sorted(args.methods, key=lambda m: m != "byot")  # byot first: see the docstring
    runs = [(m, s) for s in args.seeds for m in methods]
    state: dict[str, Any] = {
        "config": {**vars(args), "dataset_label": (
            "CIFAR-10 (JPEG q75)" if args.dataset == "cifar10" else args.dataset)},
        "plan": plan_epochs(args, read_json(out / "throughput.json")), "runs": []}
    log(f"epoch plan: {state['plan']}")
    first = f"{args.work}/byot-seed{args.seeds[0]}/last.pt"
    if "accuracy" in parts:  # the first byot run, then the runtime part, then the rest
        ok &= part("accuracy", out, lambda: accuracy(args, state, runs[:1]), args.tiny)
    if "runtime" in parts:
        ok &= part("runtime", out, lambda: runtime(args, Path(first)), args.tiny)
    if "accuracy" in parts and len(runs) > 1:
        ok &= part("accuracy", out, lambda: accuracy(args, state, runs[1:]), args.tiny)
    if "accuracy" in parts:
        failed = [r for r in state["runs"] if "error" in r]
        ok &= not failed
    log(f"gpu study {'done' if ok else 'done, with FAILURES (see summary.md)'} in "
        f"{time.time() - T0:.0f}s; results in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
