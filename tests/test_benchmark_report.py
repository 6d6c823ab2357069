"""benchmarks/report.py on the committed result JSONs: tables, targets, marked regions (--write / --check)."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the benchmark scripts import their sibling modules by name
import harness  # noqa: E402
import report  # noqa: E402


@pytest.fixture(scope="module")
def regions() -> dict[str, str]:
    return report.render_regions(report.load_sources())


def test_tables_from_committed_results(regions):
    assert "| prefill 128K, B=1 (s) | 13.06 | 8.57 | 6.30 | 4.07 | (a) HF SDPA 11.76 |" in regions["e2e"]
    assert "| decode 32K, B=8 (ms/token) | 20.51 | 15.46 | 12.96 | 10.44 | (b) static + compile 112.8; (a) 65.0 |" \
        in regions["e2e"]
    assert "| prefill / analytical floor | 1.11-1.15 | 1.08-1.11 | 1.07 | 1.03-1.05 |  |" in regions["e2e"]
    assert "| aoti-sparse | 10.4 (1.29x) | 36.4 (1.98x) |" in regions["export"]
    assert "| passkey | retrieval | accuracy | 62.0% (124/200) | 0.0% (0/200) | 55.5% (111/200) | 0.06 | 4.6% |" \
        in regions["training"]
    assert "Source: `benchmarks/results/training/smollm2_eval_h100_200.json`; NVIDIA H100 80GB HBM3;" \
        in regions["training"]
    assert "| 128K | 441.1 | 241.7 (582) |" in regions["kernels-prefill"]
    assert "| 8, 32K | 0.368 / 0.354 |" in regions["kernels-decode"]


def test_old_files_read_not_recorded(regions):
    """Files written before the harness have no commit or command: the report says so instead of failing."""
    assert "commit not recorded" in regions["kernels-prefill"] and "command: not recorded" in regions["export"]
    assert "commit 2c4049b;" in regions["e2e"]


def test_targets_region(regions):
    text = regions["targets"]
    assert "`benchmarks/results/e2e/e2e_h100.json`: 25 met, 10 missed, 3 not measured." in text
    assert "- **missed**: decode 32768 B=8: fluxc r=0 / r=0.75: 1.582 (goal >= 1.8)" in text
    assert "- met: SA-fraction gap, holistic - retrieval families (router): 0.9036 (goal >= 0.4)" in text
    assert "- **missed**: lm: router / full perplexity: 1.107 (goal <= 1.02)" in text


def test_new_style_provenance_is_shown(tmp_path):
    meta = harness.provenance(["benchmarks/router_op.py", "out.json"])
    path = tmp_path / "router_op.json"
    path.write_text(json.dumps(dict(meta=meta, rows=[dict(T=32768, pool_size=150, ms=0.01)])))
    sources = report.load_sources(overrides={"router_op": str(path)})
    assert "command: `benchmarks/router_op.py out.json`" in report.provenance_line(sources["router_op"])
    assert f"`{path}`: 1 met, 0 missed" in report.targets_region(sources)


def test_write_then_check(tmp_path, capsys):
    path = tmp_path / "README.md"
    assert report.main(["--write", str(path)]) == 0  # a new file gets every region
    text = path.read_text()
    assert all(f"<!-- fluxc-report:{name} -->" in text for name in report.REGIONS)
    assert report.main(["--check", str(path)]) == 0
    # a README with one stale region and text around it: --check names it, --write fixes only the region
    start, end = "<!-- fluxc-report:e2e -->\n", "<!-- /fluxc-report:e2e -->"
    path.write_text(f"# Title\n\nintro\n{start}old table\n{end}\n\nafter\n")
    assert report.main(["--check", str(path)]) == 1
    assert "stale region(s): e2e" in capsys.readouterr().err
    assert report.main(["--write", str(path)]) == 0
    new = path.read_text()
    assert new.startswith("# Title\n\nintro\n" + start + "llama-3.1-8b") and new.endswith(end + "\n\nafter\n")
    assert report.main(["--check", str(path)]) == 0


def test_unknown_region_and_missing_source(tmp_path, capsys):
    path = tmp_path / "r.md"
    path.write_text("<!-- fluxc-report:nope -->\n<!-- /fluxc-report:nope -->\n")
    assert report.main(["--check", str(path)]) == 2
    assert "unknown report region(s): nope" in capsys.readouterr().err
    sources = report.load_sources(overrides={"e2e": str(tmp_path / "absent.json")})
    assert report.e2e_region(sources).startswith("Not measured:")
    assert "absent.json`: missing." in report.targets_region(sources)


@pytest.mark.parametrize("document", ["benchmarks/results/REPORT.md", "README.md"])
def test_committed_tables_are_current(document):
    """The generated regions match the committed JSONs and targets.toml (regenerate with --write FILE)."""
    assert report.main(["--check", str(BENCH.parent / document)]) == 0
