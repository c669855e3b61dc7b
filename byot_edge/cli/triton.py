"""`byot-edge triton-repo`: a Triton model repository from a deploy folder (byot_edge.triton)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from byot_edge.cli.app import app, console, output_folder

TRITON_EXAMPLE = """
Examples:

  byot-edge triton-repo deploy/manifest.json --out model_repository

  byot-edge triton-repo deploy/manifest.json --out model_repository --segments tensorrt --max-batch 64 --instances 2

  byot-edge triton-repo deploy/manifest.json --out model_repository --mode inprocess

  PYTHONPATH=$(python -c 'import site; print(site.getsitepackages()[0])') tritonserver --model-repository model_repository

The Python-backend models import byot-edge: run Triton where `pip install 'byot-edge\\[onnxruntime]'` is installed for the Python its stub runs, or name that environment's site-packages in PYTHONPATH (the models add it; the stub itself ignores it). See docs/triton.md.
"""


@app.command("triton-repo", epilog=TRITON_EXAMPLE)
def triton_repo_command(
    manifest: Annotated[Path, typer.Argument(help="manifest.json written by `byot-edge export "
                                                  "--segments`.")],
    out: Annotated[Path, typer.Option(help="New (or empty) folder for the model repository.")],
    segments: Annotated[str, typer.Option(
        help="How the segment models run: python (ONNX Runtime inside Triton's Python "
             "backend), onnxruntime (platform onnxruntime_onnx) or tensorrt (tensorrt_plan, "
             "from the manifest's segment engines).")] = "python",
    mode: Annotated[str, typer.Option(
        help="bls: the cascade calls one model per segment (cross-request batching at every "
             "exit); inprocess: one model runs the whole cascade itself.")] = "bls",
    name: Annotated[str, typer.Option(help="The cascade model's name (segment models are "
                                           "NAME_segmentK, NAME_spanI_J).")] = "byot",
    max_batch: Annotated[int, typer.Option(help="max_batch_size of every model.")] = 32,
    instances: Annotated[int, typer.Option(
        help="Instances of each segment model (of the model, in-process).")] = 1,
    cascade_instances: Annotated[int, typer.Option(
        help="Instances of the BLS cascade model: requests that run at once.")] = 2,
    max_queue_delay_us: Annotated[int, typer.Option(
        help="Longest a request waits in a dynamic batcher for others to join it.")] = 100,
    threads: Annotated[int, typer.Option(
        help="ONNX Runtime threads per Python-backend model instance (0: its default).")] = 0,
) -> None:
    """Write a Triton Inference Server model repository that serves the anytime cascade."""
    from byot_edge.triton.repository import RepoOptions, write_repository

    output_folder(out, "--out")
    options = RepoOptions(name=name, mode=mode, segments=segments, max_batch=max_batch,
                          instances=instances, cascade_instances=cascade_instances,
                          max_queue_delay_us=max_queue_delay_us, threads=threads)
    record = write_repository(manifest, out, options)
    models = [name, *(m["model"] for m in record["models"].values())]
    console.print(f"wrote {out}: {len(models)} model(s): {', '.join(models)} ({mode}, "
                  f"segments: {segments}); {len(record['files'])} files with their sha256 in "
                  f"{name}/1/repository.json", highlight=False, soft_wrap=True)
