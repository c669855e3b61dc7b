"""Writing the chosen thresholds into the manifest, and plotting the candidates."""

from __future__ import annotations

from pathlib import Path

from byot_edge.calibrate.candidates import Calibration
from byot_edge.manifest import Manifest, Thresholds


def write_thresholds(manifest: Manifest, cal: Calibration, source: str,
                     backend: str = "torch", precision: str = "fp32") -> Path:
    """Store the chosen thresholds in the manifest, every other field untouched; `backend`
    and `precision` say whose logits they were fitted on."""
    c = cal.chosen
    expected: dict[str, float] = {
        "accuracy": c.accuracy, "deepest_accuracy": cal.deepest_accuracy,
        "accuracy_drop_points": 100 * (cal.deepest_accuracy - c.accuracy),
        "flops": c.flops, "deepest_flops": cal.exits_alone[-1].flops,
        "worst_case_flops": c.worst_flops,
        **{f"exit{k}_fraction": f for k, f in enumerate(c.fractions, start=1)},
    }
    # Per shallow exit, how often its answers agreed with the deepest exit's and on how
    # many samples: what the server's audit (--audit-rate) holds live answers to.
    for k, (agreeing, n) in enumerate((c.exit_agreement or ())[:-1], start=1):
        if n:
            expected[f"exit{k}_agreement"] = agreeing / n
            expected[f"exit{k}_agreement_samples"] = float(n)
    if c.latency_ms is not None:
        expected["latency_ms"] = c.latency_ms
        expected["worst_case_latency_ms"] = float(c.worst_latency_ms or 0.0)
        if cal.exits_alone[-1].latency_ms:
            expected["deepest_latency_ms"] = float(cal.exits_alone[-1].latency_ms)
    if cal.guarantee is not None:
        g = cal.guarantee
        expected["guaranteed_max_risk_points"] = 100 * g.max_risk
        expected["risk_bound_points"] = 100 * g.bound
        expected["disagreement_points"] = 100 * (1 - c.agreement)
    manifest.thresholds = Thresholds(
        cal.criterion, list(c.thresholds), cal.temperatures, source, expected, backend,
        precision, [gate.as_dict() for gate in cal.gates] if cal.gates is not None else None,
        cal.guarantee.as_dict() if cal.guarantee is not None else None)
    return manifest.save()


def plot_calibration(cal: Calibration, path: str | Path) -> Path:
    """Accuracy against expected cost: the frontier of candidates, each exit alone, the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from byot_edge.fileio import atomic_write

    axes_spec = [("flops", "expected MFLOPs per sample", 1e-6)]
    if cal.chosen.latency_ms is not None:
        axes_spec.insert(0, ("latency", "expected latency per sample (ms)", 1.0))
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(6 * len(axes_spec), 4.5), squeeze=False)
    for ax, (metric, label, scale) in zip(axes[0], axes_spec, strict=True):
        pts = sorted(cal.candidates, key=lambda c: c.cost(metric))
        ax.scatter([c.cost(metric) * scale for c in pts], [100 * c.accuracy for c in pts],
                   s=4, color="0.75", label="candidates")
        fr = cal.frontier(metric)
        ax.plot([c.cost(metric) * scale for c in fr], [100 * c.accuracy for c in fr],
                "-", color="tab:blue", label=f"thresholds ({cal.criterion})")
        for c in cal.exits_alone:
            x = c.cost(metric) * scale
            ax.plot(x, 100 * c.accuracy, "s", color="tab:orange")
            ax.annotate(c.method.replace(" alone", ""), (x, 100 * c.accuracy),
                        textcoords="offset points", xytext=(4, -10), fontsize=8)
        ax.plot(cal.chosen.cost(metric) * scale, 100 * cal.chosen.accuracy, "*", ms=14,
                color="tab:red", label="chosen")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(cal.objective, fontsize=9)
    fig.tight_layout()
    out = atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return out
