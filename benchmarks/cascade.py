"""Cascade benchmark: the calibrated anytime cascade against the deepest exit, in one run.

On CIFAR-10 (JPEG q75), with a model trained at CPU scale:
- accuracy and mean latency of the cascade at thresholds calibrated on the validation split
  (`--max-drop` points) against the deepest exit alone, on the test split;
- the worst case (every sample runs every step of the calibrated cascade, the branches of
  the exits that are on included, to exit K or to the first exit whose threshold 0 answers
  everyone) against the full network; and, for reference, every exit on up to exit K.
Targets: <= 0.5 points below the deepest exit at <= half its mean latency; worst case
<= 1.10x the full network. The three are measured interleaved, block by block, in one run,
so machine noise hits them alike; the ratios are what to compare. Each mode runs `--block`
batches in a row (as a deployment serving it would), then the next mode takes its turn.

It also checks, on the validation images, that the runtime's cascade (ONNX Runtime and
PyTorch) gives exactly the exits and predictions that replaying the recorded validation
logits gives with the same thresholds.

Steps (each is skipped when its output already exists in --out, so a rerun resumes):
  1. unpack the CIFAR-10 JPEG archive to --data-dir            (when it is not there)
  2. train (`byot-edge train`), or use --checkpoint
  3. validation and test logits (`byot-edge eval --save-logits`)
  4. export every exit and segment (export_checkpoint)
  5. profile every file, span and cascade plan on this machine (profile_backend; again when
     the stored profile predates plan timing)
  6. calibrate on the validation logits (calibrate_manifest, with a plot)
  7. cascade == offline replay on the validation images
  8. cascade vs deepest exit vs worst case on the test images

    python benchmarks/cascade.py --train --out runs/bench-cascade            # everything
    python benchmarks/cascade.py --checkpoint runs/r18/best.pt --out runs/bc # a trained model
    python benchmarks/cascade.py --train --epochs 1 --max-train-samples 2000 --width 0.125 \\
        --limit 500 --out /tmp/bc-smoke                                       # a smoke run

Writes OUT/REPORT.json (every figure), OUT/REPORT.png and OUT/REPORT-calibration.png
(REPORT: --report, default "cascade"), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
UNPACK = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "unpack.py"
TARGETS = {"accuracy_drop_points": 0.5, "latency_ratio": 0.5, "worst_case_ratio": 1.10}


def say(msg: str) -> None:
    print(f"[cascade] {msg}", flush=True)


def cli(*args: str) -> None:
    """Run `byot-edge ARGS` in a subprocess (the contract the other parts expose)."""
    cmd = [sys.executable, "-m", "byot_edge.cli", *args]
    say(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True, cwd=REPO)


def prepare_data(data_dir: Path, unpack: Path) -> None:
    if (data_dir / "cifar-10-batches-py").is_dir():
        return
    say(f"unpacking CIFAR-10 (JPEG q75) into {data_dir}")
    subprocess.run([sys.executable, str(unpack), str(data_dir), "--format", "cifar"], check=True)


def train(args: argparse.Namespace) -> Path:
    run = args.out / "run"
    ckpt = run / "best.pt"
    if ckpt.exists():
        return ckpt
    extra = ["--max-train-samples", str(args.max_train_samples)] if args.max_train_samples else []
    extra += ["--threads", str(args.threads)] if args.threads else []
    cli("train", "--arch", args.arch, "--dataset", "cifar10", "--data-dir", str(args.data_dir),
        "--epochs", str(args.epochs), "--width", str(args.width), "--val-split", "0.1",
        "--device", "cpu", "--out", str(run), *extra)
    if not ckpt.exists():
        ckpt = run / "last.pt"
    return ckpt


def logits(args: argparse.Namespace, ckpt: Path, split: str) -> Path:
    path = args.out / f"{split}_logits.npz"
    if not path.exists():
        cli("eval", str(ckpt), "--dataset", "cifar10", "--data-dir", str(args.data_dir),
            "--split", split, "--save-logits", str(path))
    return path


def export(args: argparse.Namespace, ckpt: Path) -> Path:
    from byot_edge.export.exporter import export_checkpoint

    manifest = args.out / "deploy" / "manifest.json"
    if not manifest.exists():
        say("exporting every exit and segment")
        export_checkpoint(ckpt, manifest.parent, segments=True, data_dir=args.data_dir,
                          progress=lambda s: say(f"  {s}"))
    return manifest


def options(args: argparse.Namespace) -> dict[str, Any]:
    return {"threads": args.threads} if args.threads else {}


def profile(args: argparse.Namespace, manifest_path: Path) -> None:
    from byot_edge.manifest import load_manifest
    from byot_edge.runtime.backends import get_backend
    from byot_edge.runtime.profile import profile_backend, store_profiles

    m = load_manifest(manifest_path)
    with get_backend(args.backend, m, **options(args)) as backend:
        if any(p.backend == backend.name and p.device == backend.device and p.batch == args.batch
               and p.plans for p in m.latency_profiles):
            return  # (a profile without the runtime's plans predates them: profile again)
        say(f"profiling on {backend.device}, batch {args.batch}")
        store_profiles(m, profile_backend(backend, [args.batch], runs=args.profile_runs))


def calibrate(args: argparse.Namespace, manifest_path: Path, val_logits: Path) -> dict[str, Any]:
    from byot_edge.calibrate import calibrate_manifest

    cal = calibrate_manifest(manifest_path, val_logits, criterion=args.criterion,
                             temperature=args.temperature, max_drop=args.max_drop,
                             max_worst_case=args.max_worst_case, backend=args.backend,
                             batch=args.batch, plot=args.out / f"{args.report}-calibration.png")
    c = cal.chosen
    say(f"calibrated: thresholds {[round(t, 4) for t in c.thresholds]}, validation accuracy "
        f"{100 * c.accuracy:.2f}% (deepest {100 * cal.deepest_accuracy:.2f}%), exit shares "
        f"{[round(f, 3) for f in c.fractions]}, {cal.objective}")
    return {"thresholds": list(c.thresholds), "criterion": cal.criterion,
            "temperatures": cal.temperatures, "objective": cal.objective, "metric": cal.metric,
            "val_accuracy": c.accuracy, "val_deepest_accuracy": cal.deepest_accuracy,
            "val_exit_shares": list(c.fractions), "expected_flops": c.flops,
            "expected_latency_ms": c.latency_ms, "expected_worst_latency_ms": c.worst_latency_ms,
            "candidates": len(cal.candidates)}


def normalised(images: np.ndarray, manifest: Any, limit: int | None) -> np.ndarray:
    from byot_edge.runtime.preprocess import normalise

    return normalise(images[:limit] if limit else images, manifest.input)


def replay_check(args: argparse.Namespace, manifest_path: Path, ckpt: Path,
                 val_logits: Path) -> dict[str, Any]:
    """The runtime's cascade on the validation images vs replaying the recorded logits."""
    from byot_edge.calibrate import load_logits
    from byot_edge.checkpoint import load_checkpoint
    from byot_edge.runtime.anytime import AnytimeModel
    from byot_edge.runtime.policies import ConfidenceThresholds, simulate
    from byot_edge.train import eval_split

    val = load_logits(val_logits)
    arrays, _ = eval_split(load_checkpoint(ckpt), "val", data_dir=args.data_dir)
    out: dict[str, Any] = {"samples": len(val.labels)}
    for backend in ("onnxruntime", "torch"):
        with AnytimeModel.load(manifest_path, backend=backend, **options(args)) as model:
            th = model.manifest.thresholds
            assert th is not None
            policy = ConfidenceThresholds.for_model(th.values, model.num_exits, th.criterion,
                                                    th.temperatures)
            sim = simulate(val.logits, policy)
            x = normalised(arrays.images, model.manifest, None)
            exits, preds = [], []
            for i in range(0, len(x), 256):
                r = model.run(x[i:i + 256])
                exits.append(r.exits)
                preds.append(r.indices)
            exits_a, preds_a = np.concatenate(exits), np.concatenate(preds)
            out[backend] = {"exit_mismatches": int((exits_a != sim.exits).sum()),
                            "prediction_mismatches": int((preds_a != sim.predictions).sum())}
            say(f"replay check ({backend}): {out[backend]} of {len(x)} validation images")
    return out


def measure(args: argparse.Namespace, manifest_path: Path, test_logits: Path) -> dict[str, Any]:
    from byot_edge.calibrate import load_logits
    from byot_edge.datasets import load_arrays
    from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
    from byot_edge.runtime.policies import NEVER, ConfidenceThresholds, simulate

    model = AnytimeModel.load(manifest_path, backend=args.backend, **options(args))
    test = load_arrays("cifar10", args.data_dir, "test")
    x = normalised(test.images, model.manifest, args.limit)
    y = test.labels[:len(x)]
    k_max = model.num_exits
    never = ConfidenceThresholds.for_model(NEVER, k_max)
    th = model.manifest.thresholds
    assert th is not None
    # The worst case runs the calibrated cascade's steps (the exits that are on, branches
    # included) with no sample answered before the deepest exit (or the first exit whose
    # threshold 0 answers everyone: no sample gets past it).
    calibrated = ConfidenceThresholds.for_model(th.values, k_max)
    plan, slowest = calibrated.active_exits(k_max), calibrated.worst_case()
    every_exit = tuple(range(1, k_max + 1))
    modes = {
        "cascade": lambda b: model.run(b),
        "deepest": lambda b: model.run(b, PredictOptions(exit=k_max)),
        "worst_case": lambda b: model.run_policy(b, slowest, plan=plan),
        # For reference: the worst case if every exit were on (every branch computed).
        "worst_case_every_exit": lambda b: model.run_policy(b, never, plan=every_exit),
    }
    model.warmup(args.batch)
    for _ in range(args.warmup_rounds):
        for fn in modes.values():
            fn(x[:args.batch])
    wall = {m: [] for m in modes}  # per call, ms
    answer = {m: [] for m in modes}  # per sample, ms from the call's start
    exits = {m: [] for m in modes}
    preds = {m: [] for m in modes}
    names = list(modes)
    starts = list(range(0, len(x), args.batch))
    # Each mode runs `--block` batches in a row, as a deployment serving it would (switching
    # modes every batch would time every session with cold caches); the modes take turns,
    # block by block, so drifts in machine load hit them alike.
    blocks = [starts[i:i + args.block] for i in range(0, len(starts), args.block)]
    say(f"measuring {len(x)} test images, batch {args.batch}, blocks of {args.block} batches, "
        f"on {model.backend.device}")
    for j, block in enumerate(blocks):
        for m in names[j % len(names):] + names[:j % len(names)]:  # no mode always runs first
            for i in block:
                xb = x[i:i + args.batch]
                t0 = time.perf_counter()
                r = modes[m](xb)
                wall[m].append((time.perf_counter() - t0) * 1e3)
                answer[m].append(r.latency_ms)
                exits[m].append(r.exits)
                preds[m].append(r.indices)
    res: dict[str, Any] = {}
    for m in names:
        p, e = np.concatenate(preds[m]), np.concatenate(exits[m])
        per_call = np.asarray(wall[m])
        res[m] = {
            "accuracy": float((p == y).mean()),
            # Batch 1: the call's wall time; larger batches: when each sample was answered.
            "mean_latency_ms": float(per_call.mean() if args.batch == 1
                                     else np.concatenate(answer[m]).mean()),
            "p50_call_ms": float(np.percentile(per_call, 50)),
            "p90_call_ms": float(np.percentile(per_call, 90)),
            "time_per_sample_ms": float(per_call.sum() / len(x)),
            "exit_shares": [float((e == k).mean()) for k in range(1, k_max + 1)],
        }
    # The test logits, replayed with the same thresholds, must give the same cascade.
    tl = load_logits(test_logits)
    sim = simulate(tl.logits[:, :len(x)], ConfidenceThresholds.for_model(
        th.values, k_max, th.criterion, th.temperatures))
    res["test_replay_mismatches"] = {
        "exits": int((np.concatenate(exits["cascade"]) != sim.exits).sum()),
        "predictions": int((np.concatenate(preds["cascade"]) != sim.predictions).sum())}
    res["test_exit_accuracy"] = [float((z[:len(x)].argmax(1) == y).mean()) for z in tl.logits]
    res["device"] = model.backend.device
    res["samples"] = len(x)
    res["plan"] = list(plan)
    # What the calibrated cascade runs, step by step, for a sample that reaches exit K.
    res["cascade_calls"] = [name for name, _ in model.run_policy(x[:args.batch], slowest,
                                                                 plan=plan).calls]
    return res


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m, style in (("cascade", "o"), ("deepest", "s"), ("worst_case", "^"),
                     ("worst_case_every_exit", "v")):
        r = res[m]
        a.plot(r["mean_latency_ms"], 100 * r["accuracy"], style, ms=9, label=m.replace("_", " "))
    a.set_xlabel("mean latency per sample (ms)")
    a.set_ylabel("test accuracy (%)")
    a.grid(alpha=0.3)
    a.legend()
    shares = np.asarray(res["cascade"]["exit_shares"])
    b.bar(np.arange(1, len(shares) + 1), 100 * shares)
    b.set_xlabel("exit")
    b.set_ylabel("test samples answered (%)")
    b.set_title("where the cascade answers")
    fig.suptitle(f"CIFAR-10 (JPEG q75), {res['samples']} test images, {res['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-cascade")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="a trained CIFAR-10 checkpoint")
    src.add_argument("--train", action="store_true", help="train one first (CPU scale)")
    p.add_argument("--data-dir", type=Path, default=Path("/tmp/cifar10"))
    p.add_argument("--unpack-script", type=Path, default=UNPACK)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch, ORT)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--batch", type=int, default=1, help="batch size of the latency runs")
    p.add_argument("--limit", type=int, default=None, help="test images to measure")
    p.add_argument("--block", type=int, default=50,
                   help="batches each mode runs in a row before the next takes its turn "
                        "(1: switch every batch, every session timed cold)")
    p.add_argument("--max-drop", type=float, default=0.5)
    p.add_argument("--max-worst-case", type=float, default=None,
                   help="calibrate with this worst-case bound (x the deepest exit), e.g. 1.1")
    p.add_argument("--report", default="cascade", help="name of the .json/.png reports")
    p.add_argument("--criterion", default="max_softmax")
    p.add_argument("--temperature", action="store_true")
    p.add_argument("--profile-runs", type=int, default=200)
    p.add_argument("--warmup-rounds", type=int, default=20)
    p.add_argument("--skip-replay-check", action="store_true")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    prepare_data(args.data_dir, args.unpack_script)
    ckpt = train(args) if args.train else args.checkpoint
    val_logits, test_logits = logits(args, ckpt, "val"), logits(args, ckpt, "test")
    manifest = export(args, ckpt)
    profile(args, manifest)
    report: dict[str, Any] = {"checkpoint": str(ckpt), "batch": args.batch, "block": args.block,
                              "backend": args.backend, "targets": TARGETS}
    report["calibration"] = calibrate(args, manifest, val_logits)
    if not args.skip_replay_check:
        report["replay_check_val"] = replay_check(args, manifest, ckpt, val_logits)
    res = measure(args, manifest, test_logits)
    report.update(res)
    c, d, w = res["cascade"], res["deepest"], res["worst_case"]
    report["ratios"] = {
        "accuracy_drop_points": 100 * (d["accuracy"] - c["accuracy"]),
        "latency_ratio": c["mean_latency_ms"] / d["mean_latency_ms"],
        "worst_case_ratio": w["mean_latency_ms"] / d["mean_latency_ms"],
    }
    # Not a target: the compute a batch takes (what a server waits for before it replies to
    # the whole batch); at batch 1 it is the latency ratio.
    report["batch_time_ratio"] = c["time_per_sample_ms"] / d["time_per_sample_ms"]
    every = res["worst_case_every_exit"]["mean_latency_ms"] / d["mean_latency_ms"]
    report["targets_met"] = {k: report["ratios"][k] <= v for k, v in TARGETS.items()}
    (args.out / f"{args.report}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(res, args.out / f"{args.report}.png")

    print(f"\nCIFAR-10 (JPEG q75) test, {res['samples']} images, batch {args.batch}, "
          f"{args.backend} on {res['device']}")
    print(f"exits on: {res['plan']}; the cascade runs {' then '.join(res['cascade_calls'])}")
    print(f"{'':22} {'accuracy':>9} {'mean ms':>9} {'p90 ms':>8} {'exit shares':>24}")
    for m in ("cascade", "deepest", "worst_case", "worst_case_every_exit"):
        r = res[m]
        shares = " ".join(f"{s:.2f}" for s in r["exit_shares"])
        print(f"{m:22} {100 * r['accuracy']:8.2f}% {r['mean_latency_ms']:9.3f} "
              f"{r['p90_call_ms']:8.3f} {shares:>24}")
    for k, v in report["ratios"].items():
        met = "met" if report["targets_met"][k] else "NOT met"
        print(f"{k:22} {v:7.3f}   target <= {TARGETS[k]:.2f}: {met}")
    print(f"worst case with every exit on (for reference): {every:.3f}x the full network")
    if args.batch > 1:
        print(f"batch wall time, cascade / deepest: {report['batch_time_ratio']:.3f} (mean ms "
              "above: when each sample was answered, from its batch's start)")
    print(f"test replay mismatches: {res['test_replay_mismatches']}")
    print(f"wrote {args.out}/{args.report}.json, .png and -calibration.png")


if __name__ == "__main__":
    main()
