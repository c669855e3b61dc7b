"""The README's figures come from the JSON files in docs/results/, and every such file is cited.

The README quotes measured figures only in its results table. Each row names its benchmark
(linked to its docs/results.md section), the JSON the figures come from, and in the
"measured" column the figures themselves: every number there must equal the JSON's value
rounded as the README prints it, in the order FIGURES lists them. A figure typed by hand, or
left behind when a JSON changes, fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
RESULTS = REPO / "docs" / "results"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

Getter = Callable[[dict[str, Any]], float]


def pct(x: float) -> float:
    return 100 * x


def _quickstart_exit(k: int) -> Getter:
    return lambda d: pct(d["test"]["exits"][k - 1]["top1"])


def _throughput_ratio(mode: str, clients: str = "32") -> Getter:
    return lambda d: (d["results"][mode][clients]["throughput"]
                      / d["results"]["direct"][clients]["throughput"])


def _policy_exceed(method: str) -> Getter:
    return lambda d: pct(d["resplits"]["methods"][method]["exceed_fraction"])


def _int8(what: str, key: str) -> Getter:
    return lambda d: next(r[key] for r in d["cascade"]["rows"] if r["what"] == what)


def _tax(exit_: int, ratio: str) -> Getter:
    return lambda d: next(r["ratios"][ratio]["median"] for r in d["summary"]
                          if r["batch"] == 1 and r["exit"] == exit_)


def _mismatches(mode: str) -> Getter:
    return lambda d: sum(d["runtime"][mode]["replay_mismatches"].values())


# Row (the benchmark's link text) -> its JSON and, in order, a getter per number quoted.
FIGURES: dict[str, tuple[str, list[Getter]]] = {
    "The quickstart": ("quickstart.json", [
        _quickstart_exit(1), _quickstart_exit(2), _quickstart_exit(3), _quickstart_exit(4),
        lambda d: pct(d["cascade"]["accuracy"]),
        lambda d: d["cascade"]["profile_latency_ratio"],
        lambda d: d["cascade"]["latency_ratio"],
        lambda d: d["cascade"]["ms_per_image"],
        lambda d: d["cascade"]["deepest_ms_per_image"],
    ]),
    "The quickstart's calibration": ("quickstart.json", [
        lambda d: d["thresholds"]["values"][0],
        lambda d: d["thresholds"]["values"][1],
        lambda d: d["thresholds"]["values"][2],
        lambda d: pct(d["thresholds"]["guarantee"]["bound"]),
    ]),
    "Calibration's guarantee, Fashion-MNIST": ("policies_fashion_mnist.json", [
        _policy_exceed("max_softmax, LTT drop"), _policy_exceed("max_softmax, point estimate"),
    ]),
    "Calibration's guarantee, CIFAR-10": ("policies_cifar10.json", [
        _policy_exceed("max_softmax, LTT drop"), _policy_exceed("max_softmax, point estimate"),
    ]),
    "Through the runtime, CIFAR-10": ("policies_cifar10.json", [
        lambda d: pct(d["runtime"]["max_softmax LTT"]["accuracy"]),
        lambda d: pct(d["runtime"]["deepest exit"]["accuracy"]),
        lambda d: d["runtime"]["max_softmax LTT"]["ratio_to_deepest"],
        _mismatches("max_softmax LTT"),
    ]),
    "BYOT against dsn": ("accuracy_cpu_study.json", [
        lambda d: pct(d["runs"]["byot"][0]["top1"][0]),
        lambda d: pct(d["runs"]["dsn"][0]["top1"][0]),
        lambda d: pct(d["runs"]["byot"][0]["top1"][3]),
        lambda d: pct(d["runs"]["dsn"][0]["top1"][3]),
    ]),
    "INT8 exits": ("int8_cpu_ltt.json", [
        _int8("int8 deepest exit", "latency_vs_fp32_deepest"),
        _int8("int8 deepest exit", "points_vs_fp32_deepest"),
        _int8("int8 cascade", "latency_vs_fp32_deepest"),
        _int8("int8 cascade", "points_vs_fp32_deepest"),
    ]),
    "The runtime's tax": ("runtime_tax_cpu_width1_b1.json", [
        _tax(1, "ours/plain|1 thread"), _tax(0, "ours/own|1 thread"),
    ]),
    "Serving under load": ("deadline_load_cpu.json", [
        lambda d: pct(d["runs"]["deadline"]["2.0"]["within_deadline_server"]),
        lambda d: pct(d["runs"]["deadline"]["2.0"]["within_deadline"]),
        lambda d: pct(d["runs"]["cascade"]["2.0"]["within_deadline"]),
        lambda d: pct(d["runs"]["deepest"]["2.0"]["within_deadline"]),
        lambda d: pct(d["runs"]["deadline"]["2.0"]["shed"]),
        lambda d: d["drift"]["clean_requests"],
        lambda d: d["drift"]["alarm_after_drifted_requests"],
    ]),
    "A pretrained start": ("pretrained_start_cifar10.json", [
        *(lambda d, k=k: pct(d["runs"]["ft_pretrained"]["test_top1"][k]) for k in range(4)),
        *(lambda d, k=k: pct(d["runs"]["scratch_quick"]["test_top1"][k]) for k in range(4)),
    ]),
    "Triton": ("triton_load_cpu_shared.json", [
        _throughput_ratio("triton-bls"), _throughput_ratio("triton-inprocess"),
        _throughput_ratio("serve"),
    ]),
}

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def results_table(readme: str = README) -> list[dict[str, str]]:
    start = readme.index("\n## Results\n")
    end = readme.find("\n## ", start + 1)
    rows = []
    for line in readme[start:end if end > 0 else None].splitlines():
        if not line.startswith("| ["):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, f"a row has 4 cells (benchmark, setup, measured, JSON): {line}"
        (name, target), = LINK.findall(cells[0])
        (_, json_link), = LINK.findall(cells[3])
        rows.append({"name": name, "section": target, "measured": cells[2], "json": json_link})
    return rows


def check_row(row: dict[str, str]) -> None:
    name = row["name"]
    assert name in FIGURES, f"README results row {name!r}: say in FIGURES where it comes from"
    file, getters = FIGURES[name]
    assert row["json"] == f"docs/results/{file}", (name, row["json"], file)
    assert row["section"].startswith("docs/results.md#"), (name, row["section"])
    data = json.loads((RESULTS / file).read_text())
    printed = NUMBER.findall(row["measured"])
    assert len(printed) == len(getters), (
        f"{name!r} quotes {len(printed)} numbers ({printed}) and FIGURES checks {len(getters)}")
    for text, get in zip(printed, getters, strict=True):
        decimals = len(text.split(".")[1]) if "." in text else 0
        expected = f"{get(data):.{decimals}f}"
        assert text.replace(",", "") == expected, (
            f"{name!r}: the README says {text}, {file} says {expected}")


def test_the_readme_has_a_results_table_with_every_row_checked():
    rows = results_table()
    assert len(rows) >= 5
    assert {r["name"] for r in rows} == set(FIGURES), "FIGURES and the README's table differ"


@pytest.mark.parametrize("row", results_table(), ids=lambda r: r["name"])
def test_each_readme_figure_is_its_json_value(row: dict[str, str]):
    check_row(row)


def test_a_figure_typed_by_hand_fails():
    # The check can fail: the quickstart row with one figure nudged.
    row = next(r for r in results_table() if r["name"] == "The quickstart")
    first = NUMBER.search(row["measured"])
    assert first is not None
    wrong = f"{float(first.group()) + 0.01:.2f}"
    with pytest.raises(AssertionError, match="the README says"):
        check_row({**row, "measured": row["measured"].replace(first.group(), wrong, 1)})


def test_the_readme_first_picture_is_the_trade_off():
    first = re.search(r"!\[[^\]]*\]\(([^)]+)\)", README)
    assert first is not None and first.group(1) == "docs/img/quickstart_accuracy.png"


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 260


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_every_results_json_is_cited(path: Path):
    cited = [d.name for d in DOCS if path.name in d.read_text()]
    assert cited, f"{path.name} is cited by no document: cite it in docs/results.md or remove it"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_points_at_something(doc: Path):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for _, target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        missing_anchor = (dest.exists() and anchor and dest.suffix == ".md"
                          and anchor not in _anchors(dest))
        if not dest.exists() or missing_anchor:
            broken.append(target)
    assert not broken, f"{doc.name}: links to nothing: {broken}"


def test_the_quickstart_time_the_readme_quotes_is_the_runs():
    (minutes,) = re.findall(r"the quickstart took (\d+\.\d) min", README)
    seconds = json.loads((RESULTS / "quickstart.json").read_text())["seconds"]
    assert minutes == f"{seconds / 60:.1f}", (minutes, seconds)


def _summary_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart_summary",
                                                  REPO / "scripts" / "quickstart_summary.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_quickstart_tables_are_the_summarys():
    # docs/results.md's quickstart tables are `quickstart_summary.py --tables` output, not typed.
    printed = _summary_module().tables(json.loads((RESULTS / "quickstart.json").read_text()))
    results = (REPO / "docs" / "results.md").read_text()
    for table in printed.split("\n\n"):
        assert table in results, table


def test_the_quickstart_summary_is_assembled_from_the_runs_files(tmp_path: Path):
    # A run folder rebuilt from the committed summary's own parts gives the same summary.
    s = json.loads((RESULTS / "quickstart.json").read_text())
    (tmp_path / "bench").mkdir()
    (tmp_path / "deploy").mkdir()
    (tmp_path / "test_eval.json").write_text(json.dumps(
        {"checkpoint": "best.pt", "split": "test", "dataset": "fashion-mnist", **s["test"]}))
    (tmp_path / "bench" / "bench.json").write_text(json.dumps(
        {"created": s["created"], "machine": s["machine"], **s["bench"]}))
    (tmp_path / "deploy" / "manifest.json").write_text(json.dumps(
        {"exits": [{}] * len(s["thresholds"]["values"] + [0]), "thresholds": s["thresholds"]}))
    module = _summary_module()
    # The profile's pricing reads the real manifest's latency profile, which this folder
    # lacks: the summary's own figures stand in (calibration's tests cover the pricing).
    priced = ("profile_ms_per_image", "profile_deepest_ms", "profile_latency_ratio")
    module._profile_priced = lambda *_: {k: s["cascade"][k] for k in priced}
    assert module.summary(tmp_path, s["seconds"]) == s
    targets = {what: met for what, _, met in module.targets(s)}
    assert targets["deepest exit >= 90% top-1"] == (s["test"]["exits"][3]["top1"] >= 0.9)
