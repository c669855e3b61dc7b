"""int8 against fp32 exits on the CPU: latency at batch 1 and 32, and test accuracy, per exit.

    python benchmarks/int8.py runs/cifar/best.pt --data-dir /tmp/cifar10 --out /tmp/int8-bench \\
        --json docs/results/int8_cpu.json

Exports the checkpoint twice, with `byot_edge.export.export_checkpoint` (what `byot-edge
export` runs): fp32, and `--precision int8` (calibrated on `--calibration-images` training
images). Then, per exit: top-1 of both files on the whole test split, and their latency at
each batch size, timed interleaved (`byot_edge.timing.interleave`: the two files take turns,
so a shared machine's drift hits both alike) with plain one-thread ONNX Runtime sessions.
Ratios are int8 p50 / fp32 p50 from that one run.

Then the cascades (`cascade_rows`): each folder is profiled at batch 1 and calibrated on its
own files' logits over the validation split (`byot-edge calibrate --data-dir`, what a user
runs on the target; with Learn-then-Test at `--delta`, 0.1 by default, as the CLI does),
the int8 cascade and the fp32 one are scored on the test split through the runtime, and
timed at batch 1, interleaved with the fp32 deepest exit, one test image per call.
`--reuse --cascade-only` re-measures the cascades on existing exports and keeps the per-exit
rows of `--json`.

Targets (issue 16): int8 / fp32 latency <= 0.5 at batch 1; accuracy per exit within 0.5
points of fp32; the int8 cascade's mean latency <= 0.25x the fp32 deepest exit's, within 0.5
points of its test top-1.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

import byot_edge  # noqa: F401  (sets the OpenMP wait policy before torch starts)

TARGET_LATENCY_RATIO = 0.5
TARGET_ACCURACY_POINTS = 0.5
TARGET_CASCADE_LATENCY = 0.25  # int8 cascade mean latency / fp32 deepest exit


def export_both(args: argparse.Namespace) -> tuple[Path, Path, list[dict[str, Any]]]:
    from byot_edge.export.exporter import export_checkpoint

    fp32, int8 = args.out / "fp32", args.out / "int8"
    common = {"segments": True, "data_dir": args.data_dir, "progress": print}
    export_checkpoint(args.checkpoint, fp32, **common)
    _, reports = export_checkpoint(args.checkpoint, int8, precision="int8",
                                   calibration_images=args.calibration_images, **common)
    checks = [{"file": r.file, "exit": r.exit, "top1_agreement": r.top1_agreement,
               "max_rel": r.max_rel, "samples": r.samples, "note": r.note}
              for r in reports if r.kind.startswith("int8")]
    return fp32, int8, checks


def session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def test_split(manifest: Any, data_dir: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from byot_edge.datasets import load_arrays

    arrays = load_arrays(manifest.dataset, data_dir, "test")
    images, labels = arrays.images[:limit], arrays.labels[:limit]
    mean = np.asarray(manifest.input.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(manifest.input.std, np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((images.astype(np.float32) / 255 - mean) / std), labels


def accuracy(sess: Any, x: np.ndarray, labels: np.ndarray, chunk: int = 250) -> float:
    name = sess.get_inputs()[0].name
    hits = sum(int((sess.run(None, {name: x[i:i + chunk]})[0].argmax(1)
                    == labels[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    return hits / len(x)


def latency(fp32: Any, int8: Any, x: np.ndarray, runs: int) -> dict[str, Any]:
    from byot_edge.timing import interleave

    name = fp32.get_inputs()[0].name
    timed = interleave({"fp32": lambda: fp32.run(None, {name: x}),
                        "int8": lambda: int8.run(None, {name: x})}, runs=runs, max_seconds=15)
    stats = {k: v.stats.to_dict() for k, v in timed.items()}
    return {**stats, "ratio_p50": stats["int8"]["p50"] / stats["fp32"]["p50"],
            "ratio_mean": stats["int8"]["mean"] / stats["fp32"]["mean"]}


def per_exit(args: argparse.Namespace, fp32_dir: Path,
             int8_dir: Path) -> tuple[list[dict[str, Any]], int]:
    from byot_edge.manifest import TRUNCATED_ONNX, load_manifest

    fm, qm = load_manifest(fp32_dir), load_manifest(int8_dir)
    x, labels = test_split(fm, args.data_dir, args.test_limit)
    rows = []
    for k in range(1, fm.num_exits + 1):
        f = session(fm.file_path(k, TRUNCATED_ONNX), args.threads)
        q = session(qm.file_path(k, TRUNCATED_ONNX), args.threads)
        acc_f, acc_q = accuracy(f, x, labels), accuracy(q, x, labels)
        row: dict[str, Any] = {"exit": k, "fp32_top1": acc_f, "int8_top1": acc_q,
                               "delta_points": 100 * (acc_q - acc_f), "latency": {}}
        for b in args.batch:
            row["latency"][str(b)] = latency(f, q, x[:b], args.runs if b == 1 else
                                             max(20, args.runs // 4))
        rows.append(row)
        print(f"exit {k}: fp32 {acc_f:.2%} int8 {acc_q:.2%}; " + ", ".join(
            f"b{b} {row['latency'][str(b)]['ratio_p50']:.2f}x" for b in args.batch), flush=True)
    return rows, len(labels)


def profile_and_calibrate(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What a user runs on the target: `byot-edge profile` (batch 1, so calibration prices
    each plan by its measured latency here), then `byot-edge calibrate --data-dir` on the
    folder's own files (fp32 or int8) over the validation split."""
    from byot_edge.calibrate import calibrate_engine
    from byot_edge.manifest import load_manifest
    from byot_edge.runtime.backends import get_backend
    from byot_edge.runtime.profile import profile_backend, store_profiles

    manifest = load_manifest(folder)
    with get_backend("onnxruntime", manifest, threads=args.threads) as be:
        store_profiles(manifest, profile_backend(be, [1], max_seconds=args.profile_seconds))
    cal = calibrate_engine(folder / "manifest.json", args.data_dir, backend="onnxruntime",
                           threads=args.threads, max_drop=args.max_drop,
                           delta=args.delta or None,
                           save_logits=folder / "val_logits.engine.npz")
    th = load_manifest(folder).thresholds
    assert th is not None
    c = cal.chosen
    return {"thresholds": list(c.thresholds), "fitted_on": f"{th.backend} {th.precision}",
            "guarantee": cal.guarantee.as_dict() if cal.guarantee else "point estimate",
            "source": th.source, "val_accuracy": c.accuracy,
            "val_deepest_accuracy": cal.deepest_accuracy,
            "val_expected_latency_ms": c.latency_ms, "val_exit_fractions": list(c.fractions)}


def cascade_test(model: Any, x: np.ndarray, labels: np.ndarray, options: Any = None,
                 chunk: int = 500) -> dict[str, Any]:
    """Test top-1 and exit shares of the runtime's cascade under the manifest's thresholds
    (or `options`'), and of its deepest exit alone."""
    from byot_edge.runtime.anytime import PredictOptions

    k_max = model.num_exits
    exits, hits, deepest_hits = [], 0, 0
    for i in range(0, len(x), chunk):
        r = model.run(x[i:i + chunk], options)
        exits.append(r.exits)
        hits += int((np.asarray(r.indices) == labels[i:i + chunk]).sum())
        d = model.run(x[i:i + chunk], PredictOptions(exit=k_max))
        deepest_hits += int((np.asarray(d.indices) == labels[i:i + chunk]).sum())
    shares = np.bincount(np.concatenate(exits), minlength=k_max + 1)[1:] / len(x)
    return {"top1": hits / len(x), "deepest_top1": deepest_hits / len(x),
            "exit_fractions": shares.tolist()}


def cascade_latency(models: dict[str, Any], x: np.ndarray, runs: int) -> dict[str, Any]:
    """Mean latency per image at batch 1, timed interleaved: each entry runs test images
    0, 1, 2, ... in turn (the same images for every entry), through the runtime."""
    from byot_edge.runtime.anytime import PredictOptions
    from byot_edge.timing import interleave

    def calls(model: Any, options: PredictOptions) -> Any:
        state = {"i": 0}

        def call() -> Any:
            i = state["i"] % len(x)
            state["i"] += 1
            return model.run(x[i:i + 1], options)

        return call

    fns = {name: calls(model, opts) for name, (model, opts) in models.items()}
    timed = interleave(fns, warmup=20, runs=runs, max_seconds=600)
    return {name: t.stats.to_dict() for name, t in timed.items()}


def cascade_rows(args: argparse.Namespace, fp32_dir: Path, int8_dir: Path) -> dict[str, Any]:
    """The int8 cascade calibrated on the int8 files' own validation logits, against the fp32
    deepest exit (test top-1, mean latency at batch 1), and the fp32 cascade calibrated on
    the fp32 files' logits, in the same run. Target: int8 cascade mean latency <= 0.25x the
    fp32 deepest exit, within 0.5 points of its top-1."""
    from byot_edge.manifest import load_manifest
    from byot_edge.runtime.anytime import AnytimeModel, PredictOptions

    fitted = {"fp32": profile_and_calibrate(fp32_dir, args),
              "int8": profile_and_calibrate(int8_dir, args)}
    models = {p: AnytimeModel.load(d, threads=args.threads)
              for p, d in (("fp32", fp32_dir), ("int8", int8_dir))}
    x, labels = test_split(load_manifest(fp32_dir), args.data_dir, args.test_limit)
    # What serving the int8 files with thresholds fitted on fp32 logits gives (the mismatch
    # the runtime warns about).
    mismatched = PredictOptions(threshold=fitted["fp32"]["thresholds"])
    test = {p: cascade_test(m, x, labels) for p, m in models.items()}
    test["int8 files, fp32 thresholds"] = cascade_test(models["int8"], x, labels, mismatched)
    k_max = models["fp32"].num_exits
    timed = cascade_latency({
        "fp32 deepest exit": (models["fp32"], PredictOptions(exit=k_max)),
        "fp32 cascade": (models["fp32"], PredictOptions()),
        "int8 cascade": (models["int8"], PredictOptions()),
        "int8 deepest exit": (models["int8"], PredictOptions(exit=k_max)),
        "int8 files, fp32 thresholds": (models["int8"], mismatched),
    }, x, args.cascade_runs)
    base_ms, base_top1 = timed["fp32 deepest exit"]["mean"], test["fp32"]["deepest_top1"]
    rows = []
    for name, stats in timed.items():
        precision, what = name.split(" ", 1)
        if name in test:
            precision, what = name, "cascade"
        t = test[precision]
        top1 = t["top1"] if what == "cascade" else t["deepest_top1"]
        rows.append({"what": name, "test_top1": top1,
                     "points_vs_fp32_deepest": 100 * (top1 - base_top1),
                     "mean_ms": stats["mean"], "p50_ms": stats["p50"],
                     "latency_vs_fp32_deepest": stats["mean"] / base_ms,
                     **({"exit_fractions": t["exit_fractions"]} if what == "cascade" else {})})
    int8 = next(r for r in rows if r["what"] == "int8 cascade")
    return {"status": "measured", "rows": rows, "calibration": fitted,
            "timing": f"byot_edge.timing.interleave through AnytimeModel.run at batch 1, "
                      f"{args.threads} ONNX Runtime thread(s), {args.cascade_runs} calls each "
                      "on test images 0, 1, 2, ... (the same for every entry); mean ms",
            "targets": {"latency_vs_fp32_deepest_max": TARGET_CASCADE_LATENCY,
                        "points_max": TARGET_ACCURACY_POINTS,
                        "met_latency": int8["latency_vs_fp32_deepest"]
                        <= TARGET_CASCADE_LATENCY,
                        "met_accuracy": abs(int8["points_vs_fp32_deepest"])
                        <= TARGET_ACCURACY_POINTS}}


def cascade_table(cascade: dict[str, Any]) -> str:
    lines = ["| what | test top-1 | points vs fp32 deepest | mean ms (b1) | vs fp32 deepest "
             "| % answered at exits 1..K |", "|" + " --- |" * 6]
    for r in cascade["rows"]:
        shares = " ".join(f"{100 * f:.0f}" for f in r.get("exit_fractions", [])) or "-"
        lines.append(f"| {r['what']} | {r['test_top1']:.2%} | {r['points_vs_fp32_deepest']:+.2f} "
                     f"| {r['mean_ms']:.3f} | {r['latency_vs_fp32_deepest']:.2f}x | {shares} |")
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], batches: list[int]) -> str:
    head = "| exit | fp32 top-1 | int8 top-1 | change (points) | " + " | ".join(
        f"b{b} fp32 / int8 ms (p50) | b{b} int8/fp32" for b in batches) + " |"
    lines = [head, "|" + " --- |" * (4 + 2 * len(batches))]
    for r in rows:
        cells = [str(r["exit"]), f"{r['fp32_top1']:.2%}", f"{r['int8_top1']:.2%}",
                 f"{r['delta_points']:+.2f}"]
        for b in batches:
            lat = r["latency"][str(b)]
            cells += [f"{lat['fp32']['p50']:.2f} / {lat['int8']['p50']:.2f}",
                      f"{lat['ratio_p50']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="work folder for the two exports")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--runs", type=int, default=200, help="timed calls at batch 1 (÷4 above)")
    p.add_argument("--test-limit", type=int, default=None, help="first N test images only")
    p.add_argument("--max-drop", type=float, default=0.5,
                   help="cascades: accuracy points calibration may lose on validation")
    p.add_argument("--delta", type=float, default=0.1,
                   help="calibrate with Learn-then-Test at this delta (0: the point estimate)")
    p.add_argument("--profile-seconds", type=float, default=1.0,
                   help="cascades: `byot-edge profile --max-seconds` before calibrating")
    p.add_argument("--cascade-runs", type=int, default=2000,
                   help="cascades: timed batch-1 calls per entry (one test image each)")
    p.add_argument("--reuse", action="store_true",
                   help="use the exports already in --out (export only what is missing)")
    p.add_argument("--cascade-only", action="store_true",
                   help="measure the cascade rows only; keep the per-exit rows of --json")
    p.add_argument("--note", default="", help="e.g. whether the machine was shared")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    start = time.time()
    fp32_dir, int8_dir = args.out / "fp32", args.out / "int8"
    checks: list[dict[str, Any]] = []
    if not (args.reuse and (fp32_dir / "manifest.json").is_file()
            and (int8_dir / "manifest.json").is_file()):
        fp32_dir, int8_dir, checks = export_both(args)
    if args.cascade_only:
        if not (args.json and args.json.is_file()):
            raise SystemExit("--cascade-only keeps the per-exit rows of an existing --json")
        report = json.loads(args.json.read_text())
    else:
        rows, n_test = per_exit(args, fp32_dir, int8_dir)
        report = per_exit_report(args, rows, n_test, checks)
        print(table(rows, args.batch))
    load_before = os.getloadavg()
    cascade = cascade_rows(args, fp32_dir, int8_dir)
    cascade["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    cascade["note"] = args.note
    cascade["seconds"] = round(time.time() - start, 1)
    report["cascade"] = cascade
    print(cascade_table(cascade))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


def per_exit_report(args: argparse.Namespace, rows: list[dict[str, Any]], n_test: int,
                    checks: list[dict[str, Any]]) -> dict[str, Any]:
    import onnxruntime as ort

    from byot_edge.checkpoint import load_checkpoint
    from byot_edge.runtime.backends.devices import cpu_name

    state = load_checkpoint(args.checkpoint)
    return {
        "what": "int8 (QDQ, ONNX Runtime static quantization) vs fp32 exit files, per exit",
        "checkpoint": str(args.checkpoint), "model_config": state["model_config"],
        "epochs": state.get("epoch"), "dataset": state["data"]["dataset"],
        "calibration_images": args.calibration_images, "test_images": n_test,
        "cpu": cpu_name(), "onnxruntime": ort.__version__, "threads": args.threads,
        "timing": "byot_edge.timing.interleave, p50 ms, int8/fp32 ratio from one run",
        "note": args.note, "export_checks": checks, "exits": rows,
        "targets": {"latency_ratio_b1_max": TARGET_LATENCY_RATIO,
                    "accuracy_points_max": TARGET_ACCURACY_POINTS,
                    "met_latency_b1": {str(r["exit"]): r["latency"]["1"]["ratio_p50"]
                                       <= TARGET_LATENCY_RATIO for r in rows if "1" in
                                       r["latency"]},
                    "met_accuracy": {str(r["exit"]): abs(r["delta_points"])
                                     <= TARGET_ACCURACY_POINTS for r in rows}},
    }


if __name__ == "__main__":
    main()
