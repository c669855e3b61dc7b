"""BYOT against dsn and plain: same network, data, epochs and seeds; per exit and ensemble.

    python benchmarks/accuracy.py --data-dir /tmp/cifar10 --out runs/accuracy
    python benchmarks/accuracy.py --data-dir /tmp/cifar10 --width 1 --epochs 250 --recipe paper

`--data-dir` holds cifar-10-batches-py; on these machines make it from the shared CIFAR-10
(JPEG q75) with `python ../shared/data/cifar10-jpeg/unpack.py /tmp/cifar10 --format cifar`
(call it "CIFAR-10 (JPEG q75)" wherever the figures go). Prints mean ± std over seeds of the
test top-1 of every exit and the ensemble, writes results.json and accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import byot_edge  # noqa: F401  (sets the OpenMP wait policy before torch starts)
from byot_edge.checkpoint import load_checkpoint, load_model
from byot_edge.datasets import dataset_info, load_arrays
from byot_edge.evaluate import evaluate
from byot_edge.train import train
from byot_edge.train_config import config_from_recipe

METHODS = ("byot", "dsn", "plain")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--out", default="runs/accuracy")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--recipe", default="quick")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    p.add_argument("--feature-weight", type=float, default=None, help="default: 0.03")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # Only what was given overrides the recipe, so every method gets the very same schedule.
    extra = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr),
                               ("feature_weight", args.feature_weight)) if v is not None}

    out = Path(args.out)
    test = load_arrays(args.dataset, args.data_dir, "test")
    info = dataset_info(args.dataset)
    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            run = out / f"{method}-seed{seed}"
            cfg = config_from_recipe(
                args.recipe, arch=args.arch, dataset=args.dataset, data_dir=args.data_dir,
                out=str(run), width=args.width, epochs=args.epochs, method=method, seed=seed,
                max_train_samples=args.max_train_samples, device=args.device, amp=args.amp,
                **extra)
            t = time.perf_counter()
            last = run / "last.pt"
            done = last.is_file() and load_checkpoint(last)["epoch"] >= args.epochs
            if not done:  # finished runs are reused, stopped ones resumed
                train(cfg, resume=last if last.is_file() else None)
            model, _ = load_model(run / "last.pt")
            ev = evaluate(model, test, info, split="test")
            results[method].append({"seed": seed, "train_s": time.perf_counter() - t,
                                    "top1": [r.top1 for r in ev.rows]})
            print(f"{method} seed {seed}: " + " ".join(f"{r.name} {r.top1:.2%}" for r in ev.rows),
                  flush=True)
            # after every run, so a stopped study keeps what it finished
            out.mkdir(parents=True, exist_ok=True)
            (out / "partial.json").write_text(json.dumps({"config": vars(args),
                                                          "runs": results}, indent=2))

    names = [f"exit {k}" for k in range(1, len(next(iter(results.values()))[0]["top1"]))]
    names.append("ensemble")
    print(f"\n{args.dataset} test top-1, {args.arch} x{args.width}, {args.epochs} epochs "
          f"({args.recipe}), seeds {args.seeds}: mean ± std")
    print(f"{'method':8s}" + "".join(f"{n:>18s}" for n in names))
    summary = {}
    for method, runs in results.items():
        cols = list(zip(*(r["top1"] for r in runs), strict=True))
        means = [statistics.mean(c) for c in cols]
        stds = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols]
        summary[method] = {"mean": means, "std": stds}
        print(f"{method:8s}" + "".join(f"{100 * m:11.2f} ± {100 * s:4.2f}"
                                       for m, s in zip(means, stds, strict=True)))
    (out / "results.json").write_text(json.dumps(
        {"config": vars(args), "names": names, "runs": results, "summary": summary}, indent=2))
    _plot(out / "accuracy.png", names, summary, args)
    print(f"wrote {out / 'results.json'} and {out / 'accuracy.png'}")


def _plot(path: Path, names: list[str], summary: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(summary)
    for i, (method, s) in enumerate(summary.items()):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [100 * m for m in s["mean"]], width, yerr=[100 * v for v in s["std"]],
               label=method, capsize=3)
    ax.set_xticks([j + width * (len(summary) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{args.dataset} (JPEG q75 where so unpacked), {args.arch} x{args.width}, "
                 f"{args.epochs} epochs, {len(args.seeds)} seeds", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
