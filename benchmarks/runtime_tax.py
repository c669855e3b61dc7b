"""What the anytime runtime costs on top of ONNX Runtime itself: `AnytimeModel.predict(x,
exit=k)` against the best plain `onnxruntime.InferenceSession` a user could make on the
same file, and the cascade through the runtime against the same sessions chained bare.

    python benchmarks/runtime_tax.py deploy/manifest.json --batch 1 32

Session options tried, for our backend and the plain sessions alike: ONNX Runtime's
defaults (a thread per core, idle workers spinning), 1 thread, and 2 threads whose idle
workers sleep. For every batch, exit and configuration, our path and the plain sessions
take turns in one interleaved run (byot_edge.timing.interleave), so each ratio printed is
from one run:

- `ours/plain`: our path against a plain session with the same options;
- `ours/answer`: against the plain session followed by the least numpy a user writes to
  answer from its logits (class and probability): what is left once answering itself is
  paid for (at batch 1 that numpy is dear: docs/design.md, "The runtime's own time");
- `ours/own`: against our backend's own session called bare (the same session, so it is
  the runtime's Python alone, without the few percent two sessions of one file differ by);
- `best/best`: our fastest configuration against the fastest plain session (each
  configuration is its own interleaved run, so this ratio spans runs);
- `gate/ours` (with `--gates`, cascade row): the learned gates' cascade against the
  max-softmax one, both through the runtime (target: at most 1.05x).

The cascade row runs every sample through every exit (thresholds off: the most steps and
the most policy calls a cascade has) against the same segment sessions chained with
nothing between them. Targets: at most 1.05x at every exit at batch 1 and 32; the cascade
at most 1.03x. `--clock thread` times the calling thread's CPU time instead of the wall
clock (only the 1-thread configuration then): on a machine shared with other busy
processes it is the figure preemption does not move. Every row records the load average.
`--repeats R` makes R such runs of every row and prints the median and the range of each
ratio over them: one run's batch-1 ratios move by about 0.02 between runs, as much as the
margins the targets leave.
This supersedes the ONNX Runtime part of benchmarks/backend_overhead.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from byot_edge.plans import Plan
from byot_edge.runtime.anytime import AnytimeModel
from byot_edge.runtime.backends import EXIT, SEGMENT, artifact_name
from byot_edge.runtime.gates import FEATURES, ExitGates, Gate
from byot_edge.runtime.policies import NEVER, ConfidenceThresholds
from byot_edge.timing import interleave

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"spin": True},  # ONNX Runtime's defaults (our backend's spin=False is not)
    "1 thread": {"threads": 1},
    "2 threads, no spin": {"threads": 2, "spin": False},
}
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def plain_session(path: str, threads: int | None = None, spin: bool | None = None) -> Any:
    """The session a user would make by hand with these options."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if spin is not None:
        for pool in ("intra_op", "inter_op"):
            opts.add_session_config_entry(f"session.{pool}.allow_spinning", str(int(spin)))
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def users_answer(logits: np.ndarray) -> tuple[list[int], list[float]]:
    """The least a user of a plain session writes to answer: each sample's class and its
    probability (numpy as one would write it, not the runtime's tuned softmax)."""
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return logits.argmax(axis=1).tolist(), (1.0 / e.sum(axis=1)).tolist()


def exit_ways(models: dict[str, AnytimeModel], k: int,
              x: np.ndarray) -> dict[str, Callable[[], object]]:
    """Per configuration: our predict, a plain session on exit k's file, that session with
    the user's own answer after it, and our own session."""
    ways: dict[str, Callable[[], object]] = {}
    for config, model in models.items():
        name = artifact_name(EXIT, k)
        feed = {model.backend.load(name).input: x}
        plain = plain_session(str(model.manifest.file_path(k, "onnx")), **CONFIGS[config])
        own = model.backend.session(name)  # type: ignore[attr-defined]
        ways[f"ours|{config}"] = lambda m=model: m.predict(x, exit=k)
        ways[f"plain|{config}"] = lambda s=plain, f=feed: s.run(None, f)
        ways[f"answer|{config}"] = lambda s=plain, f=feed: users_answer(s.run(None, f)[0])
        ways[f"own|{config}"] = lambda s=own, f=feed: s.run(None, f)
    return ways


def bare_chain(model: AnytimeModel, x: np.ndarray) -> Callable[[], object]:
    """Segments 1..K of our backend's own sessions, each output fed to the next."""
    steps = []
    for k in range(1, model.num_exits + 1):
        name = artifact_name(SEGMENT, k)
        io = model.backend.load(name)
        wanted = [io.section] if io.section else [io.logits]
        steps.append((model.backend.session(name), io.input, wanted))  # type: ignore[attr-defined]

    def chain() -> object:
        h = x
        for session, inp, wanted in steps:
            h = session.run(wanted, {inp: h})[0]
        return h

    return chain


def never_gates(model: AnytimeModel) -> ExitGates:
    """Learned gates (the manifest's, else zero weights: the cost is the same) that never
    answer early, so every step scores every sample, as the max-softmax row does."""
    th = model.manifest.thresholds
    gates = ([Gate.from_dict(g) for g in th.gates] if th is not None and th.gates
             else [Gate((0.0,) * len(FEATURES), 0.0)] * (model.num_exits - 1))
    return ExitGates.for_model(gates, NEVER, model.num_exits)


def cascade_ways(models: dict[str, AnytimeModel], x: np.ndarray,
                 gates: bool = False) -> dict[str, Callable[[], object]]:
    ways: dict[str, Callable[[], object]] = {}
    for config, model in models.items():
        never = ConfidenceThresholds.for_model(NEVER, model.num_exits)
        plan = Plan.every_exit(model.num_exits)
        ways[f"ours|{config}"] = (  # answers as predict() makes them: no probabilities
            lambda m=model, p=never, q=plan: m.run_policy(x, p, q, probabilities=False))
        ways[f"own|{config}"] = bare_chain(model, x)
        if gates:  # the learned gates' cascade, every sample through every exit too
            ways[f"gate|{config}"] = (
                lambda m=model, p=never_gates(model), q=plan: m.run_policy(
                    x, p, q, probabilities=False))
    return ways


def measure(ways: dict[str, Callable[[], object]], args: argparse.Namespace) -> dict[str, Any]:
    """One interleaved run per configuration: a session's spinning workers would otherwise
    take the cores from the other configurations' calls (as three default sessions in one
    rotation did)."""
    before = load_avg()
    p50: dict[str, float] = {}
    runs: dict[str, int] = {}
    for config in dict.fromkeys(name.split("|")[1] for name in ways):
        mine = {name: fn for name, fn in ways.items() if name.endswith(f"|{config}")}
        timed = interleave(mine, warmup=args.warmup, runs=args.runs,
                           max_seconds=args.max_seconds, clock=CLOCKS[args.clock])
        p50.update((name, t.stats.p50) for name, t in timed.items())
        runs.update((name, t.stats.runs) for name, t in timed.items())
    return {"p50_ms": p50, "runs": runs, "load_avg_1min": [before, load_avg()]}


def ratios(p50: dict[str, float]) -> dict[str, float]:
    """ours/plain, ours/answer and ours/own per configuration, and best ours / best plain."""
    out: dict[str, float] = {}
    configs = sorted({name.split("|")[1] for name in p50})
    for config in configs:
        for base in ("plain", "answer", "own"):
            if f"{base}|{config}" in p50:
                out[f"ours/{base}|{config}"] = p50[f"ours|{config}"] / p50[f"{base}|{config}"]
        if f"gate|{config}" in p50:  # learned gates against max softmax, both ours
            out[f"gate/ours|{config}"] = p50[f"gate|{config}"] / p50[f"ours|{config}"]
    base = "plain" if any(n.startswith("plain|") for n in p50) else "own"
    best_ours = min(v for n, v in p50.items() if n.startswith("ours|"))
    best_base = min(v for n, v in p50.items() if n.startswith(f"{base}|"))
    out[f"best/best {base}"] = best_ours / best_base
    return out


def show(row: dict[str, Any]) -> None:
    """One line per configuration: p50 of each way, ours/plain, ours/own; then best/best."""
    what = f"exit {row['exit']}" if row["exit"] else "cascade"
    p50, r = row["p50_ms"], row["ratios"]
    load = f"load {row['load_avg_1min'][0]:.1f}-{row['load_avg_1min'][1]:.1f}"
    for config in sorted({name.split("|")[1] for name in p50}):
        cells = [f"{way} {p50[f'{way}|{config}']:8.3f}" for way in ("ours", "plain", "own", "gate")
                 if f"{way}|{config}" in p50]
        ratio = [f"{k.split('|')[0]} {v:.3f}x" for k, v in r.items() if k.endswith(f"|{config}")]
        print(f"batch {row['batch']:3d} {what:8s} {config:18s} {' '.join(cells)} ms | "
              f"{'  '.join(ratio)} | {load}")
    best = next(k for k in r if k.startswith("best"))
    print(f"batch {row['batch']:3d} {what:8s} {best}: {r[best]:.3f}x", flush=True)


def summarize_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range of each ratio over the repeated runs of one row (printed too)."""
    first = runs[0]
    what = f"exit {first['exit']}" if first["exit"] else "cascade"
    out: dict[str, Any] = {"batch": first["batch"], "exit": first["exit"], "ratios": {}}
    for key in first["ratios"]:
        values = sorted(r["ratios"][key] for r in runs)
        out["ratios"][key] = {"median": float(np.median(values)), "min": values[0],
                              "max": values[-1]}
        print(f"batch {first['batch']:3d} {what:8s} {key}: median {np.median(values):.3f}x "
              f"(range {values[0]:.3f}-{values[-1]:.3f}, {len(values)} runs)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--exits", type=int, nargs="+", help="default: every exit")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--clock", choices=list(CLOCKS), default="wall")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=5.0, help="per way and row")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs per row")
    p.add_argument("--no-cascade", action="store_true")
    p.add_argument("--gates", action="store_true",
                   help="also the learned gates' cascade: gate/ours is its cost against the "
                        "max-softmax cascade's (target <= 1.05x)")
    p.add_argument("--json", default="runtime_tax_cpu.json")
    args = p.parse_args()
    if args.clock == "thread":  # worker threads' time would not be counted
        args.configs = ["1 thread"]
    models = {c: AnytimeModel.load(args.manifest, backend="onnxruntime", device="cpu",
                                   **CONFIGS[c]) for c in args.configs}
    first = next(iter(models.values()))
    exits = args.exits or list(range(1, first.num_exits + 1))
    print(f"{first.manifest.model['arch']} on {first.backend.device}, clock {args.clock}, "
          f"p50 of {args.runs} runs per way", flush=True)
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for batch in args.batch:
        x = np.random.default_rng(0).standard_normal(
            (batch, *first.manifest.input.shape)).astype(first.manifest.input.dtype)
        cases = [(k, exit_ways(models, k, x)) for k in exits]
        if not args.no_cascade and first.has_segments():
            cases.append((0, cascade_ways(models, x, args.gates)))
        for k, ways in cases:
            runs = []
            for repeat in range(args.repeats):
                row = {"batch": batch, "exit": k, "repeat": repeat, **measure(ways, args)}
                row["ratios"] = ratios(row["p50_ms"])
                show(row)
                runs.append(row)
            rows += runs
            if args.repeats > 1:
                summary.append(summarize_repeats(runs))
    import onnxruntime

    out = {"manifest": str(Path(args.manifest).resolve()), "model": first.manifest.model,
           "device": first.backend.device, "cores": os.cpu_count(),
           "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
           "config": vars(args), "configs": {c: CONFIGS[c] for c in args.configs},
           "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
           "summary": summary}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
