"""benchmarks/harness.py: provenance, the atomic JSON writer, CPU timing, and targets read from data
(benchmarks/targets.toml reproduces the goals the benchmarks used to hold in code)."""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the benchmark scripts import their sibling modules by name
import harness  # noqa: E402
import measures  # noqa: E402

RESULTS = BENCH / "results"


def _git(repo: pathlib.Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_provenance_fields(monkeypatch):
    monkeypatch.setenv("FLUXC_COMMIT", "abc123-gpu-copy")
    meta = harness.provenance(["benchmarks/e2e.py", "--out", "a b.json"], benchmark="x")
    assert meta["commit"] == "abc123-gpu-copy"  # the GPU machine's copy has no .git
    assert meta["command"] == "benchmarks/e2e.py --out 'a b.json'"
    assert meta["gpu"] == "cpu" and meta["torch"] and meta["transformers"] and meta["python"] and meta["host"]
    assert "fluxc" in meta and "triton" in meta and len(meta["tree_digest"]) == 16 and meta["benchmark"] == "x"
    when = datetime.datetime.fromisoformat(meta["date"])
    assert when.utcoffset() == datetime.timedelta(0)
    json.dumps(meta)


def test_git_commit_marks_dirty_trees(monkeypatch, tmp_path):
    monkeypatch.delenv("FLUXC_COMMIT", raising=False)
    assert harness.git_commit(tmp_path) is None  # no repository
    _git(tmp_path, "init", "-q")
    (tmp_path / "f.py").write_text("a = 1\n")
    _git(tmp_path, "add", "f.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    clean = harness.git_commit(tmp_path)
    assert clean is not None and len(clean) == 40 and not clean.endswith("+dirty")
    (tmp_path / "f.py").write_text("a = 2\n")
    assert harness.git_commit(tmp_path) == clean + "+dirty"


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("killed mid-write")


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "sub" / "r.json"
    harness.write_json(path, {"rows": [1]})
    with pytest.raises(RuntimeError):
        harness.write_json(path, {"rows": [1, 2], "bad": _Unprintable()})  # fails after part of the text
    assert json.loads(path.read_text()) == {"rows": [1]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left behind


def test_results_rewrite_after_every_row(tmp_path, capsys):
    res = harness.Results(tmp_path / "r.json", {"gpu": "cpu"}, targets=[])
    res.add(kind="decode", B=1, ms=1.23456789, ms_all=[0.1234567891])
    res.add(kind="decode", B=2, ms=None)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["rows"][0] == {"kind": "decode", "B": 1, "ms": 1.234568, "ms_all": [0.123457]}
    assert doc["meta"] == {"gpu": "cpu"} and doc["targets"] == []
    assert res.find(kind="decode")["B"] == 1 and res.find(B=2) is None and res.find(B=[2, 1])["B"] == 1
    assert capsys.readouterr().out.startswith("ROW ")


def test_cpu_timing():
    assert len(harness.iter_ms(lambda: sum(range(100)), iters=4, warm=1, cuda=False)) == 4
    ms, out = harness.median_wall_ms(lambda: 7, reps=3, cuda=False)
    assert out == 7 and ms >= 0


TOML = """
[[target]]
id = "ratio"
bench = ["a", "b"]
value = 'ms(kind="x", r=0.0, L=long) / ms(kind="x", r=1.0, L=long)'
at_least = 2
label = "x {long}: r=0 / r=1"
description = "d"

[[target]]
id = "each"
bench = "a"
over = { kind = "x", r = [0.0, 1.0] }
value = "ms / get('floor', kind='f', L=L) - 1"
at_most = 0.1
label = "x r={r} {L // 1024}K"
note = "floor {get('floor', kind='f', L=L)}"
description = "d"

[[target]]
id = "absent"
bench = "a"
value = "nothing * 2"
at_most = 1
label = "absent"
description = "d"
"""


def test_targets_from_data(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(TOML)
    assert [t.id for t in harness.load_targets("b", path)] == ["ratio"]
    targets = harness.load_targets("a", path)
    rows = [dict(kind="x", r=0.0, L=2048, ms=4.0), dict(kind="x", r=1.0, L=2048, ms=1.0),
            dict(kind="x", r=0.5, L=2048, ms=2.0), dict(kind="x", r=1.0, L=4096, ms=None),
            dict(kind="f", L=2048, floor=3.8)]
    got = harness.evaluate_targets(targets, rows, {"long": 2048})
    assert got[0] == dict(id="ratio", target="x 2048: r=0 / r=1", value=4.0, goal=">= 2", met=True, note="")
    # over: one entry per matching row (r=0.5 not selected); the row without ms is left out
    assert [(e["target"], e["value"], e["met"], e["note"]) for e in got[1:3]] == [
        ("x r=0.0 2K", 0.0526, True, "floor 3.8"), ("x r=1.0 2K", -0.7368, True, "floor 3.8")]
    assert got[3] == dict(id="absent", target="absent", value=None, goal="<= 1", met=None, note="")
    assert len(got) == 4


@pytest.mark.parametrize("entry, error", [
    ('value = "__import__(\'os\')"\nat_most = 1', "only ms"),
    ('value = "ms.real"\nat_most = 1', "Attribute"),
    ('value = "2 ** 3"\nat_most = 1', "Pow"),
    ('value = "ms"\nat_most = 1\nat_least = 0', "exactly one"),
    ('value = "ms"', "exactly one"),
])
def test_targets_reject_bad_entries(tmp_path, entry, error):
    path = tmp_path / "t.toml"
    path.write_text(f'[[target]]\nid = "t"\nbench = "a"\nlabel = "t"\ndescription = "d"\n{entry}\n')
    with pytest.raises(ValueError, match=error):
        harness.load_targets("a", path)


def test_target_ids_are_unique(tmp_path):
    path = tmp_path / "t.toml"
    one = '[[target]]\nid = "t"\nbench = "a"\nlabel = "t"\ndescription = "d"\nvalue = "1"\nat_most = 1\n'
    path.write_text(one + one)
    with pytest.raises(ValueError, match="twice"):
        harness.load_targets(None, path)


@pytest.mark.parametrize("bench, path", [("e2e", "e2e/e2e_h100.json"), ("kernels", "kernels_h100.json"),
                                         ("kernels", "kernels_h100_ring_decode.json")])
def test_shipped_targets_reproduce_the_committed_results(bench, path):
    """targets.toml gives the values and verdicts the benchmarks computed in code when these files were made."""
    doc = json.loads((RESULTS / path).read_text())
    stored = {t["target"]: t for t in doc["targets"]}
    entries = measures.targets_for(bench, doc)
    same = [e for e in entries if e["target"] in stored]
    assert len(same) >= len(stored) - 4  # the kernels' routing-cost labels were renamed (no braces)
    for e in same:
        assert (e["value"], e["met"]) == (stored[e["target"]]["value"], stored[e["target"]]["met"]), e["target"]
