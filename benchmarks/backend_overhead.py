"""Our ONNX Runtime backend against a bare `onnxruntime.InferenceSession` on the same file,
and against PyTorch eager, per exit; ratios from one interleaved run.

    python benchmarks/backend_overhead.py runs/quickstart/deploy/manifest.json --batch 1 32

Three ways to get exit k's logits for the same input: a bare InferenceSession on exitK.onnx
(same thread settings), our backend's `run` (name checks, sha-verified load), and the whole
`AnytimeModel.run(exit=k)` (input validation, softmax, the answer arrays), and PyTorch
eager. Target: ours at most 1.10x the bare session. They are timed through the package's
harness (byot_edge.timing.interleave) in turns of --runs calls, --rounds turns each, so a
shared machine's drift hits them alike; each figure is the p50 over all their calls.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import numpy as np

import byot_edge  # noqa: F401  (sets the OpenMP wait policy before torch starts)
from byot_edge.runtime.anytime import AnytimeModel, PredictOptions
from byot_edge.runtime.backends import EXIT, artifact_name, get_backend
from byot_edge.timing import interleave


def _ways(bare: Any, model: AnytimeModel, torch_backend: Any, name: str, ort_input: str,
          torch_input: str, x: np.ndarray, k: int) -> dict[str, Callable[[], object]]:
    return {
        "bare session": lambda: bare.run(None, {ort_input: x}),
        "our backend": lambda: model.backend.run(name, {ort_input: x}),
        "anytime model": lambda: model.run(x, PredictOptions(exit=k)),
        "torch eager": lambda: torch_backend.run(name, {torch_input: x}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--json")
    args = p.parse_args()

    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    model = AnytimeModel.load(args.manifest, backend="onnxruntime", threads=args.threads)
    manifest = model.manifest
    torch_backend = get_backend("torch", manifest, device="cpu")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    results = []
    for batch in args.batch:
        x = np.random.default_rng(0).standard_normal(
            (batch, *manifest.input.shape)).astype(np.float32)
        for k in range(1, manifest.num_exits + 1):
            name = artifact_name(EXIT, k)
            bare = ort.InferenceSession(str(manifest.file_path(k, "onnx")), opts,
                                        providers=["CPUExecutionProvider"])
            io = model.backend.load(name)
            tio = torch_backend.load(name)
            ways = _ways(bare, model, torch_backend, name, io.input, tio.input, x, k)
            timed = interleave(ways, warmup=5, runs=args.rounds * args.runs, block=args.runs,
                               max_seconds=2 * args.rounds)
            p50 = {w: t.stats.p50 for w, t in timed.items()}
            results.append({"batch": batch, "exit": k, "p50_ms": p50})
    print(f"{manifest.model['arch']} on {model.backend.device}, {args.threads} thread(s); "
          f"p50 over {args.rounds} interleaved rounds of {args.runs} calls")
    print(f"{'batch':>5} {'exit':>4} {'bare ms':>8} {'backend/bare':>13} {'anytime/bare':>13} "
          f"{'torch/bare':>11}")
    for r in results:
        m = r["p50_ms"]
        print(f"{r['batch']:5d} {r['exit']:4d} {m['bare session']:8.3f} "
              f"{m['our backend'] / m['bare session']:12.2f}x "
              f"{m['anytime model'] / m['bare session']:12.2f}x "
              f"{m['torch eager'] / m['bare session']:10.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "device": model.backend.device,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
