"""Choosing per-exit confidence thresholds on held-out validation logits.

Input: the logits of every exit on a validation split ([K, N, C], `byot-edge eval
--save-logits`), never the test split. Every candidate set of thresholds is scored by an
offline replay of the cascade for its accuracy and its expected cost per sample, FLOPs or
measured latency; three searches propose candidates and the best one that meets the
objective wins. The modules:

- `logits`: the validation logits (a file; the seam for other sources) and temperatures;
- `engine_logits`: validation logits from the deployed files, through a runtime backend;
- `costs`: what each plan (the exits that are on) costs, from the manifest;
- `candidates`: thresholds scored by the replay; the result, `Calibration`;
- `search`: MSDNet's family, the greedy path and the direct search, on a score grid;
- `choose`: `calibrate`, the objective and the searches together;
- `output`: thresholds into the manifest, and the plot;
- `workflow`: `calibrate_manifest`, `calibrate_engine` and `calibrate_logits`, what the CLI
  runs.
"""

from byot_edge.calibrate.candidates import Calibration, Candidate, Evaluator
from byot_edge.calibrate.choose import Objective, calibrate
from byot_edge.calibrate.costs import Costs, manifest_costs, segment_flops
from byot_edge.calibrate.logits import ValLogits, fit_temperature, load_logits, save_val_logits
from byot_edge.calibrate.output import plot_calibration, write_thresholds
from byot_edge.calibrate.search import (
    MSDNET_P,
    direct_search,
    greedy_path,
    msdnet_thresholds,
    threshold_grid,
)
from byot_edge.calibrate.workflow import calibrate_engine, calibrate_logits, calibrate_manifest

__all__ = [
    "MSDNET_P", "Calibration", "Candidate", "Costs", "Evaluator", "Objective", "ValLogits",
    "calibrate", "calibrate_engine", "calibrate_logits", "calibrate_manifest", "direct_search",
    "fit_temperature", "greedy_path", "load_logits", "manifest_costs", "msdnet_thresholds",
    "plot_calibration", "save_val_logits", "segment_flops", "threshold_grid",
    "write_thresholds",
]
