"""Anytime under load: three servers at offered loads around the deepest exit's capacity,
with real test images and their labels, and a drift run for the online audit.

    python benchmarks/deadline_load.py --manifest runs/lm/deploy/manifest.json \
        --data-dir /usr/share/datasets/fashion-mnist --out runs/deadline-load

First the deepest exit's capacity C is measured: a `byot-edge serve` answering `exit=K`
under 32 closed-loop clients (its throughput), and its latency with one client (L). Each
request then gets a deadline D = --deadline-x times L. For each offered load (--loads, in
multiples of C) the same open-loop schedule (Poisson arrivals, each request sent when it is
due, whether or not the server kept up: byot_edge.loadgen.run_open_loop) goes to each of:

- deepest: the deepest exit alone (`exit=K`), no deadline;
- cascade: the calibrated cascade, no deadline (what `serve` did before deadlines);
- deadline: the calibrated cascade with `deadline_ms=D` and `serve --slo-ms D` (its busy
  rule at --slo-busy: first exits only while the server is busier than that);
- queue-only: the same with `--slo-busy 1`, where only the queue moves answers to shallower
  exits (what `--slo-ms` did before the busy rule).

Each server is a fresh process pinned to --server-cpus, the client to --client-cpus. Per
server and load: p50/p99 latency of the answers (from when each request was due), the share
of all requests answered within D, the share shed (503/504), other 5xx, no answer, accuracy
of the answers against the labels, and the mean exit. Then the drift run: the deadline
server with --audit-rate, at --drift-load x C, sends the test images as they are for
--clean-seconds (an alarm there is a false alarm), then with Gaussian noise added
(--noise, in pixel units of 0..255) until the audit's alarm gauge moves or --drift-seconds
pass; /metrics is read between slices of --slice-seconds. Writes OUT/deadline_load.json and
OUT/deadline_load.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from byot_edge import loadgen
from byot_edge.datasets import load_arrays
from byot_edge.manifest import load_manifest
from byot_edge.runtime.preprocess import normalise

SERVERS = ("deepest", "cascade", "deadline", "queue-only")
WITH_DEADLINES = ("deadline", "queue-only")  # the servers whose requests carry one


def payloads(images: np.ndarray, manifest: Any) -> list[loadgen.Payload]:
    return loadgen.npy_payloads(normalise(images, manifest.input).astype(np.float32))


def start(manifest: Path, cpus: str | None, *extra: str) -> loadgen.ServerProcess:
    prefix = ["taskset", "-c", cpus] if cpus else None
    return loadgen.start_server(["serve", str(manifest), "--port", "PORT", "--threads", "1",
                                 "--log-level", "warning", *extra], prefix=prefix)


def in_client_cpus(cpus: str | None) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def capacity(manifest: Path, deepest: int, data: list[loadgen.Payload], cpus: str | None,
             seconds: float) -> tuple[float, float, dict[str, float]]:
    """(requests/s the deepest exit's server sustains under 32 clients, its p50 latency in
    ms with one client, and for context the same throughput for exit 1 alone and for the
    calibrated cascade)."""
    server = start(manifest, cpus)
    try:
        params: dict[str, Any] = {"exit": deepest}
        loadgen.run_load(server.url, 4, 200, 2, data, params)  # warm the connections
        one = loadgen.run_load(server.url, 1, 400, seconds, data, params)
        full = loadgen.run_load(server.url, 32, 100_000, seconds, data, params)
        others = {}
        for name, other in (("exit 1", {"exit": 1}), ("cascade", {})):
            run = loadgen.run_load(server.url, 32, 100_000, seconds, data, other)
            others[name] = run.ok / run.wall_s
        return full.ok / full.wall_s, float(np.percentile(one.latencies_ms, 50)), others
    finally:
        server.stop()


def summarise(sent: list[loadgen.Sent], labels: np.ndarray, deadline_ms: float,
              seconds: float, correct: np.ndarray | None = None) -> dict[str, Any]:
    """`correct`: [K, images] whether exit k answers each image right, so that the answers
    can be held to each exit alone on the very images answered."""
    n = len(sent)
    ok = [s for s in sent if s.status == 200]
    same = ({"exit_accuracy_same_images": [float(row[[s.payload for s in ok]].mean())
                                           for row in correct]}
            if correct is not None and ok else {})
    lat = np.asarray([s.latency_ms for s in ok]) if ok else np.asarray([np.nan])
    right = [s.classes[0] == labels[s.payload] for s in ok]
    return {
        "sent": n, "offered_rps": n / seconds, "answered": len(ok),
        "within_deadline": sum(s.latency_ms <= deadline_ms for s in ok) / n,
        # The deadline as the API defines it: from when the server had the body to when its
        # response was made (the server's deadline_left_ms); the client's view above adds
        # sending, reading and the client's own delays.
        "within_deadline_server": sum(s.deadline_left_ms is not None and s.deadline_left_ms >= 0
                                      for s in ok) / n,
        "client_send_lag_p99_ms": float(np.percentile([s.send_lag_ms for s in sent
                                                       if s.send_lag_ms is not None] or
                                                      [np.nan], 99)),
        "shed": sum(s.status in (503, 504) for s in sent) / n,
        "status_504": sum(s.status == 504 for s in sent) / n,
        "other_5xx": sum(s.status >= 500 and s.status not in (503, 504) for s in sent) / n,
        "no_answer": sum(s.status == 0 for s in sent) / n,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        # Where the time beyond the server's goes: the client's view minus the server's
        # (sending, reading, the client's own scheduling), and answers the server knew late.
        "client_minus_server_p50_ms": _p50([s.latency_ms - s.server_ms for s in ok
                                           if s.server_ms is not None]),
        "server_late": sum(s.deadline_left_ms is not None and s.deadline_left_ms < 0
                           for s in ok) / n,
        "accuracy": float(np.mean(right)) if ok else float("nan"),
        "mean_exit": float(np.mean([s.exits[0] for s in ok])) if ok else float("nan"),
        **same,
    }


def _p50(values: list[float]) -> float:
    return float(np.percentile(values, 50)) if values else float("nan")


def exit_correct(manifest: Path, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[K, images]: whether each exit alone answers each image right, in-process: what the
    servers' answers are held to (exit 1 is the floor a degraded server should stay at or
    above)."""
    from byot_edge.runtime.anytime import AnytimeModel, PredictOptions

    spec = load_manifest(manifest).input
    x = normalise(images, spec).astype(np.float32)
    with AnytimeModel.load(manifest, threads=1) as model:
        return np.stack([np.asarray(model.run(x, PredictOptions(exit=k),
                                              probabilities=False).indices) == labels
                         for k in range(1, model.num_exits + 1)])


def metric(server: loadgen.ServerProcess, name: str, exit_: int) -> float:
    text = loadgen.get(server.url, "/metrics")[2].decode()
    m = re.search(rf'^{name}{{exit="{exit_}"}} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


def drift_run(manifest: Path, args: argparse.Namespace, clean: list[loadgen.Payload],
              noisy: list[loadgen.Payload], rate: float, deadline_ms: float) -> dict[str, Any]:
    server = start(manifest, args.server_cpus, "--slo-ms", f"{deadline_ms:.3f}",
                   "--slo-busy", str(args.slo_busy), "--audit-rate", str(args.audit_rate))
    params = {"deadline_ms": f"{deadline_ms:.3f}"}
    phases: list[dict[str, Any]] = []
    try:
        sent = 0
        for phase, data, limit in (("clean", clean, args.clean_seconds),
                                   ("drifted", noisy, args.drift_seconds)):
            t = 0.0
            while t < limit:
                sent += len(loadgen.run_open_loop(server.url, rate, args.slice_seconds, data,
                                                  params, seed=int(1000 * t) + len(phase)))
                t += args.slice_seconds
                alarms = {k: metric(server, "byot_edge_audit_alarm", k)
                          for k in range(1, args.exits)}
                audited = {k: metric(server, "byot_edge_audit_samples_total", k)
                           for k in range(1, args.exits)}
                agreement = {k: metric(server, "byot_edge_audit_agreement", k)
                             for k in range(1, args.exits)}
                phases.append({"phase": phase, "t_s": t, "requests": sent, "alarm": alarms,
                               "audited": audited, "agreement": agreement})
                if phase == "drifted" and any(v == 1 for v in alarms.values()):
                    break
        expected = {k: metric(server, "byot_edge_audit_expected_agreement", k)
                    for k in range(1, args.exits)}
    finally:
        server.stop()
    clean_rows = [p for p in phases if p["phase"] == "clean"]
    drifted = [p for p in phases if p["phase"] == "drifted"]
    fired = next((p for p in drifted if any(v == 1 for v in p["alarm"].values())), None)
    false_alarms = sum(any(v == 1 for v in p["alarm"].values()) for p in clean_rows)
    return {"rate_rps": rate, "audit_rate": args.audit_rate, "noise": args.noise,
            "expected_agreement": expected, "slices": phases,
            "false_alarm_slices": false_alarms, "clean_slices": len(clean_rows),
            "clean_requests": clean_rows[-1]["requests"] if clean_rows else 0,
            "alarm_after_drifted_requests": (fired["requests"] - clean_rows[-1]["requests"])
            if fired and clean_rows else None}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    loads = results["loads"]
    for name in (n for n in SERVERS if results["runs"].get(n)):
        rows = [results["runs"][name][str(x)] for x in loads]
        axes[0].plot(loads, [r["p99_ms"] for r in rows], "o-", label=name)
        line = axes[1].plot(loads, [100 * r["within_deadline"] for r in rows], "o-",
                            label=name)[0]
        if name in WITH_DEADLINES:  # the deadline as the API counts it
            axes[1].plot(loads, [100 * r["within_deadline_server"] for r in rows], ":",
                         color=line.get_color(), label=f"{name}, server's clock")
        # Against exit 1 alone on the very images answered: each load sends its own draw
        # of images, so raw accuracies move with the draw more than with the server.
        axes[2].plot(loads, [100 * (r["accuracy"] - r.get("exit_accuracy_same_images",
                                                          [np.nan])[0]) for r in rows],
                     "o-", label=name)
    axes[0].axhline(results["deadline_ms"], color="0.5", ls="--", lw=1, label="deadline")
    axes[0].set_yscale("log")
    axes[2].axhline(0, color="0.5", ls="--", lw=1)
    for ax, label in zip(axes, ("p99 latency of answers (ms)",
                                "answered within the deadline (% of requests)",
                                "accuracy over exit 1's, same images (points)"),
                         strict=True):
        ax.set_xlabel("offered load (x the deepest exit's capacity)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend()
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['model']}: deadline {results['deadline_ms']:.1f} ms, capacity "
                 f"{results['capacity_rps']:.0f} req/s ({results['machine']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def tables(results: dict[str, Any]) -> str:
    """docs/results.md's table of one run (`--tables JSON`)."""
    d = results["deadline_ms"]
    lines = [f"| load | server | answered within {d:.1f} ms, server's clock | the same, client's "
             "clock | shed (503/504) | other 5xx | p50 / p99 of answers (ms) | accuracy of "
             "answers | exit 1 alone, same images | mean exit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for x in results["loads"]:
        for name in SERVERS:
            r = results["runs"].get(name, {}).get(str(x))
            if r is None:
                continue
            server = (f"{100 * r['within_deadline_server']:.1f}%"
                      if name in WITH_DEADLINES else "-")
            same = r.get("exit_accuracy_same_images", [float("nan")])[0]
            lines.append(f"| {x:g}x | {name} | {server} | {100 * r['within_deadline']:.1f}% | "
                         f"{100 * r['shed']:.1f}% | {100 * r['other_5xx']:.0f} | "
                         f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} | {100 * r['accuracy']:.2f}% | "
                         f"{100 * same:.2f}% | {r['mean_exit']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", type=Path)
    ap.add_argument("--data-dir")
    ap.add_argument("--loads", default="0.5,1,2,3")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--no-drift", action="store_true")
    ap.add_argument("--seconds", type=float, default=6.0, help="per server and load")
    ap.add_argument("--deadline-x", type=float, default=4.0,
                    help="deadline, in multiples of the deepest exit's 1-client latency")
    ap.add_argument("--images", type=int, default=2000, help="test images sent (cycled)")
    ap.add_argument("--server-cpus", default="0")
    ap.add_argument("--client-cpus", default="1")
    ap.add_argument("--slo-busy", type=float, default=0.7, help="the deadline server's")
    ap.add_argument("--audit-rate", type=float, default=0.1)
    ap.add_argument("--noise", type=float, default=64.0)
    ap.add_argument("--drift-load", type=float, default=0.5)
    ap.add_argument("--clean-seconds", type=float, default=60.0)
    ap.add_argument("--drift-seconds", type=float, default=60.0)
    ap.add_argument("--slice-seconds", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=Path("runs/deadline-load"))
    ap.add_argument("--tables", type=Path, default=None, metavar="JSON",
                    help="print the markdown table of a run's deadline_load.json and stop")
    args = ap.parse_args()
    if args.tables is not None:
        print(tables(json.loads(args.tables.read_text())))
        return
    if args.manifest is None or args.data_dir is None:
        ap.error("--manifest and --data-dir are required (unless --tables)")
    args.out.mkdir(parents=True, exist_ok=True)
    in_client_cpus(args.client_cpus)
    manifest = load_manifest(args.manifest)
    args.exits = manifest.num_exits
    test = load_arrays(manifest.dataset, args.data_dir, "test")
    images, labels = test.images[:args.images], test.labels[:args.images]
    data = payloads(images, manifest)
    rng = np.random.default_rng(0)
    noisy_images = np.clip(images + rng.normal(0, args.noise, images.shape), 0, 255)
    noisy = payloads(noisy_images.astype(np.uint8), manifest)

    correct = exit_correct(args.manifest, images, labels)
    cap, deepest_ms, others = capacity(args.manifest, args.exits, data, args.server_cpus, 4.0)
    deadline = args.deadline_x * deepest_ms
    print(f"deepest exit: {cap:.0f} req/s under 32 clients, p50 {deepest_ms:.2f} ms alone; "
          f"deadline {deadline:.2f} ms; " + ", ".join(f"{k} {v:.0f} req/s" for k, v in
                                                     others.items()), flush=True)
    loads = [float(v) for v in args.loads.split(",")]
    runs: dict[str, dict[str, Any]] = {name: {} for name in args.servers.split(",")}
    slo = {"deadline": ("--slo-ms", f"{deadline:.3f}", "--slo-busy", str(args.slo_busy)),
           "queue-only": ("--slo-ms", f"{deadline:.3f}", "--slo-busy", "1")}
    for x in loads:
        for name in args.servers.split(","):
            extra = slo.get(name, ())
            params = ({"exit": args.exits} if name == "deepest" else
                      {"deadline_ms": f"{deadline:.3f}"} if name in slo else {})
            server = start(args.manifest, args.server_cpus, *extra)
            try:
                sent = loadgen.run_open_loop(server.url, x * cap, args.seconds, data, params,
                                             seed=int(10 * x))
            finally:
                server.stop()
            row = runs[name][str(x)] = summarise(sent, labels, deadline, args.seconds, correct)
            on_server = (f" ({100 * row['within_deadline_server']:5.1f}% by the server's "
                         "clock)" if name in slo else "")
            print(f"{x:>4}x {name:>10}: within {100 * row['within_deadline']:5.1f}%"
                  f"{on_server}  shed "
                  f"{100 * row['shed']:5.1f}%  other 5xx {100 * row['other_5xx']:.1f}%  "
                  f"p50 {row['p50_ms']:8.2f}  p99 {row['p99_ms']:8.2f} ms  acc "
                  f"{100 * row['accuracy']:5.2f}% (exit 1 alone "
                  f"{100 * row.get('exit_accuracy_same_images', [np.nan])[0]:5.2f}%)  exit "
                  f"{row['mean_exit']:.2f}  server-late "
                  f"{100 * row['server_late']:.1f}%  client-server p50 "
                  f"{row['client_minus_server_p50_ms']:.2f} ms  send lag p99 "
                  f"{row['client_send_lag_p99_ms']:.2f} ms", flush=True)
            (args.out / "partial.json").write_text(json.dumps(runs, indent=1))

    results: dict[str, Any] = {
        "model": str(args.manifest), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPUs, server on CPU {args.server_cpus}, client on "
                   f"CPU {args.client_cpus}, ONNX Runtime 1 thread",
        "capacity_rps": cap, "other_capacities_rps": others, "deepest_p50_ms": deepest_ms,
        "deadline_ms": deadline,
        "deadline_x": args.deadline_x, "slo_busy": args.slo_busy, "seconds": args.seconds,
        "images": len(images),
        "loads": loads, "runs": runs}
    results["exit_accuracy"] = [float(row.mean()) for row in correct]
    if not args.no_drift:
        results["drift"] = d = drift_run(args.manifest, args, data, noisy,
                                         args.drift_load * cap, deadline)
        print(f"drift: {d['false_alarm_slices']} false-alarm slices in {d['clean_requests']} "
              f"clean requests; alarm after {d['alarm_after_drifted_requests']} drifted "
              "requests")
    (args.out / "deadline_load.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "deadline_load.png")
    print(f"wrote {args.out / 'deadline_load.json'} and {args.out / 'deadline_load.png'}")


if __name__ == "__main__":
    main()
