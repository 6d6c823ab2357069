"""`fluxc train` / `fluxc eval` on a tiny random model (CPU): train, resume, evaluate; configs; the held-out
split between training batches and evaluation examples."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

import fluxc
from fluxc.training import load_run_config
from fluxc.training.batches import heldout_examples, training_batch, training_example
from fluxc.training.config import RunConfig, parse_override
from fluxc.training.models import ByteTokenizer
from fluxc.training.runs import read_runs

# A small variant of the shipped `tiny` config: two families, short prompts, two eval examples.
FAST = ["--set", 'data.tasks=["passkey","lm"]', "--set", "data.lengths=[448]", "--set", "data.batch_size=2",
        "--set", "run.eval_examples=1", "--set", "run.save_every=2", "--set", 'eval.tasks=["passkey","lm"]',
        "--set", "eval.examples=1", "--set", "eval.lengths=[448]", "--set", "eval.max_new_tokens=2"]


def _fluxc(*argv: str) -> int:
    """The `fluxc` console entry point (fluxc.cli.main)."""
    import fluxc.cli

    return fluxc.cli.main(list(argv))


def _steps(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if '"step"' in line and "eval_step" not in line]


def test_train_resume_and_eval_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    assert _fluxc("train", "--config", "tiny", "--out", str(out), "--steps", "2", "--eval-every", "2", *FAST) == 0
    ckpt = out / "routers.safetensors"
    info = fluxc.read_checkpoint(ckpt).provenance
    assert info["step"] == 2 and info["run_config"]["train"]["steps"] == 2
    assert info["model"]["source"] == "tiny" and info["data"]["corpus_paragraphs"] > 1000
    assert {"git", "host", "command", "train_config"} <= set(info)
    log = (out / "train_log.jsonl").read_text()
    assert [r["step"] for r in _steps(out / "train_log.jsonl")] == [1, 2] and '"eval_step": 2' in log
    printed = capsys.readouterr().out
    assert "step 2/2 loss" in printed and "SA lm=" in printed and "lambda1/2" in printed
    assert "eval @ step 2" in printed

    # resume: one more step continues from step 2 (optimiser, multipliers and RNG state restored)
    assert _fluxc("train", "--config", "tiny", "--out", str(out), "--steps", "3", "--resume", *FAST) == 0
    assert fluxc.read_checkpoint(ckpt).provenance["step"] == 3
    assert [r["step"] for r in _steps(out / "train_log.jsonl")] == [1, 2, 3]
    assert "resumed from" in capsys.readouterr().out

    assert _fluxc("eval", "--config", "tiny", "--out", str(out), *FAST) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["families"]) == {"passkey", "lm"}
    for family in result["families"].values():
        assert set(family["modes"]) == {"full", "sparse", "router"}
        assert family["modes"]["full"]["sa_fraction"] == 0.0 and family["modes"]["sparse"]["sa_fraction"] == 1.0
        assert family["modes"]["sparse"]["work_saved"] > 0.0
        assert len(family["modes"]["router"]["sa_fraction_per_layer"]) == 2
    assert "perplexity" in result["families"]["lm"]["modes"]["router"]
    assert "accuracy" in result["families"]["passkey"]["modes"]["router"]
    assert result["table"].startswith("| family |")
    assert (out / "eval_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the runs index beside the run: both trainings and the evaluation, each with its config and commit
    runs = read_runs(tmp_path / "index.jsonl")
    assert [(r["kind"], r.get("steps"), r.get("from_step")) for r in runs] == [("train", 2, 0), ("train", 3, 2),
                                                                              ("eval", None, None)]
    assert runs[1]["checkpoint_sha256"] == runs[2]["router_sha256"]  # the evaluated file is the last training's
    assert runs[0]["config"]["train"]["steps"] == 2 and runs[1]["curves"] == str(out / "train_log.jsonl")
    assert runs[2]["summary"] == result["summary"] and "commit" in runs[2]["git"]


def test_cli_errors_are_one_line_messages(tmp_path, capsys):
    assert _fluxc("train", "--config", "tiny", "--out", str(tmp_path), "--set", "train.stepz=3") == 2
    assert _fluxc("train", "--config", "tiny", "--out", str(tmp_path / "none"), "--resume") == 2
    (tmp_path / "routers.safetensors").write_bytes(b"")
    assert _fluxc("train", "--config", "tiny", "--out", str(tmp_path)) == 2  # never overwrites a run silently
    err = capsys.readouterr().err
    assert "stepz" in err and "does not exist" in err and "pass --resume" in err


def test_configs_files_and_overrides(tmp_path):
    smol = load_run_config("smollm2")
    assert smol.model.source == "smollm2" and smol.flux.router_hidden == (256, 64, 128, 32)
    assert (smol.flux.sink, smol.flux.window, smol.flux.block) == (64, 512, 64)
    assert smol.train.targets["passkey"] < 0.5 <= smol.train.targets["lm"]
    tiny = load_run_config("tiny", [parse_override("train.steps=7"), parse_override("data.lengths=[300]")])
    assert tiny.train.steps == 7 and tiny.data.lengths == (300,)
    as_json = tmp_path / "cfg.json"
    as_json.write_text(json.dumps(tiny.to_dict()))
    assert load_run_config(str(as_json)) == tiny
    with pytest.raises(fluxc.ConfigError, match="stepz"):
        load_run_config("tiny", [parse_override("train.stepz=3")])
    with pytest.raises(fluxc.ConfigError, match="no target"):
        RunConfig.from_dict({"data": {"tasks": ["passkey"]}, "train": {"targets": {"holistic": 1.0}}})
    with pytest.raises(fluxc.ConfigError, match="must be an integer"):
        load_run_config("tiny", [parse_override("data.batch_size=two")])
    with pytest.raises(fluxc.ConfigError, match="section.key=value"):
        parse_override("steps=3")
    with pytest.raises(fluxc.ConfigError, match="not a file"):
        load_run_config("no-such-config")


def test_heldout_split_never_meets_training_batches():
    cfg = load_run_config("tiny", [parse_override('data.tasks=["passkey","last_paragraph_qa","lm"]'),
                                   parse_override("data.lengths=[448]")])
    tok = ByteTokenizer()
    train = [training_example(cfg, tok, step, slot) for step in range(12) for slot in range(cfg.data.batch_size)]
    held = heldout_examples(cfg, tok, 6, (448,), ("passkey", "last_paragraph_qa", "lm"))
    assert max(e.filler_start for e in train) < min(e.filler_start for e in held)  # disjoint corpus regions
    exact = lambda data: {e.answer for e in data if e.task != "lm"}  # noqa: E731
    assert not exact(train) & exact(held)  # disjoint number sets
    assert not {tuple(e.input_ids) for e in train} & {tuple(e.input_ids) for e in held}
    # batches are a function of (step, rank): a resumed or restarted run sees the same ones; processes hold
    # different rows of the global batch (data.batch_size=3 over 3 processes: one row each)
    assert training_batch(cfg, tok, 5)["input_ids"].equal(training_batch(cfg, tok, 5)["input_ids"])
    assert not torch.equal(training_batch(cfg, tok, 5, rank=0, world=3)["input_ids"],
                           training_batch(cfg, tok, 5, rank=1, world=3)["input_ids"])


def test_eval_batches_avoid_a_lone_example():
    from fluxc.training.evaluation import _balanced

    assert [len(b) for b in _balanced(list(range(40)), 16)] == [13, 14, 13]
    assert [len(b) for b in _balanced(list(range(33)), 16)] == [11, 11, 11]
    assert [len(b) for b in _balanced(list(range(4)), 16)] == [4] and _balanced([], 4) == []


def test_length_curriculum_brings_longer_lengths_in_over_its_steps():
    from fluxc.training.batches import step_length

    def config(ramp):
        return load_run_config("tiny", [parse_override("data.lengths=[2048,512,1024]"),
                                        parse_override(f"data.curriculum_steps={ramp}")])

    # steps 0-1: the shortest only; 2-3: the two shortest; 4-5: all three; from 6 on: data.lengths in turn
    assert [step_length(config(6), s) for s in range(9)] == [512, 512, 512, 1024, 1024, 2048, 2048, 512, 1024]
    assert [step_length(config(0), s) for s in range(4)] == [2048, 512, 1024, 2048]
    with pytest.raises(fluxc.ConfigError, match="curriculum_steps=-1"):
        config(-1)


def test_route_supervision_alone_through_the_cli(tmp_path, capsys):
    """`--steps 0` with train.supervise_batches: the routers are fitted to their families' target routes and saved,
    with no Lagrangian step; without supervision, zero steps is refused."""
    out = tmp_path / "sup"
    assert _fluxc("train", "--config", "tiny", "--out", str(out), "--steps", "0", "--set", "train.supervise_batches=2",
                  "--set", "train.supervise_steps=20", *FAST) == 0
    printed = capsys.readouterr().out
    assert "route supervision on 4 examples" in printed and "kept step" in printed
    info = fluxc.read_checkpoint(out / "routers.safetensors").provenance
    assert info["step"] == 0 and info["run_config"]["train"]["supervise_batches"] == 2
    assert _fluxc("train", "--config", "tiny", "--out", str(tmp_path / "none"), "--steps", "0", *FAST) != 0
    assert "steps=0 must be >= 1 (0 only with supervise_batches" in capsys.readouterr().err


def test_route_supervision_refits_from_recorded_inputs(tmp_path, capsys):
    """run.supervise_inputs: the first run records the routers' pooled inputs; a second run reads them (no forward
    pass over the data) and fits the same routers; a file recorded for other data is refused, naming what differs."""
    inputs = tmp_path / "inputs.safetensors"
    sup = ["--steps", "0", "--set", "train.supervise_batches=2", "--set", "train.supervise_steps=20",
           "--set", f"run.supervise_inputs={inputs}", *FAST]
    assert _fluxc("train", "--config", "tiny", "--out", str(tmp_path / "a"), *sup) == 0
    assert "4 examples run with their target routes, written to" in capsys.readouterr().out
    assert _fluxc("train", "--config", "tiny", "--out", str(tmp_path / "b"), *sup) == 0
    assert f"read 4 examples from {inputs}" in capsys.readouterr().out
    first = load_file(tmp_path / "a" / "routers.safetensors")
    second = load_file(tmp_path / "b" / "routers.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert _fluxc("train", "--config", "tiny", "--out", str(tmp_path / "c"), *sup, "--set", "data.seed=5") != 0
    assert "was recorded for other ['data'] than this run's" in capsys.readouterr().err


def test_layer_choice_through_the_cli(tmp_path, capsys):
    """train.layer_choice: a listed family with a middle target gets its full layers measured and chosen before
    supervision; the run says which and how much of the all-sparse loss gap they close, and records them."""
    out = tmp_path / "lc"
    assert _fluxc("train", "--config", "tiny", "--out", str(out), "--steps", "0", "--set", "train.supervise_batches=2",
                  "--set", "train.supervise_steps=20", "--set", "train.targets.lm=0.5",
                  "--set", 'train.layer_choice=["lm"]', "--set", "train.layer_choice_batches=1", *FAST) == 0
    printed = capsys.readouterr().out
    assert "layer choice for 'lm': full attention in layers [" in printed
    assert "of the gap closed)" in printed or "all-sparse is no worse than all-full here)" in printed
    chosen = printed.split("layer choice for 'lm': full attention in layers ")[1].split("]")[0] + "]"
    entry = read_runs(out.parent / "index.jsonl")[-1]
    assert entry["kind"] == "train" and entry["full_layers"] == {"lm": json.loads(chosen)} and entry["full_layers"]["lm"]
    header = fluxc.read_checkpoint(out / "routers.safetensors").provenance["layer_choice"]["lm"]
    assert header["layers"] == json.loads(chosen) and header["loss_sparse"] >= header["loss_full"] - 1e-6


def test_eval_cut_short_leaves_a_self_describing_file(tmp_path, monkeypatch):
    """An evaluation interrupted (a time limit's SIGINT) keeps eval.json with the rows it finished and the
    summary, table, config and provenance they belong to, marked incomplete."""
    import fluxc.training.evaluation as evaluation

    out = tmp_path / "ev"
    real = evaluation._continuation_nll

    def interrupted(runner, examples, pad, device):
        if runner.__class__.__name__ != type(model_seen[0]).__name__:  # the routed modes: cut short there
            raise KeyboardInterrupt
        return real(runner, examples, pad, device)

    model_seen = []
    real_runner = evaluation._runner

    def runner(mode, model, router, flux):
        model_seen[:] = [model]
        return real_runner(mode, model, router, flux)

    monkeypatch.setattr(evaluation, "_continuation_nll", interrupted)
    monkeypatch.setattr(evaluation, "_runner", runner)
    with pytest.raises(KeyboardInterrupt):
        _fluxc("eval", "--config", "tiny", "--out", str(out), "--modes", "full,sparse", *FAST)
    result = json.loads((out / "eval.json").read_text())
    assert result["complete"] is False
    assert set(result["families"]["passkey"]["modes"]) == {"full", "sparse"}  # passkey ran in both modes
    assert set(result["families"]["lm"]["modes"]) == {"full"}  # lm's sparse row was cut short
    assert "| passkey |" in result["table"] and result["provenance"]["git"] and result["config"]["model"]
    assert result["summary"]["capable_families"]



def test_eval_shards_merge_into_the_whole_evaluation(tmp_path, capsys):
    """eval.shard splits the held-out set into runs; `fluxc eval --merge` joins their eval.json files into the
    statistics one run over every example gives; shards of different evaluations are refused."""
    common = ["eval", "--config", "tiny", "--modes", "full,sparse", *FAST, "--set", "eval.examples=4"]
    assert _fluxc(*common, "--out", str(tmp_path / "whole")) == 0
    for i in range(2):
        assert _fluxc(*common, "--out", str(tmp_path / f"s{i}"), "--set", f"eval.shard=[{i},2]") == 0
    shards = [str(tmp_path / f"s{i}" / "eval.json") for i in (1, 0)]  # any order
    assert _fluxc("eval", "--merge", *shards, "--out", str(tmp_path / "merged")) == 0
    assert "merged 2 shard(s) (complete)" in capsys.readouterr().out
    whole = json.loads((tmp_path / "whole" / "eval.json").read_text())
    merged = json.loads((tmp_path / "merged" / "eval.json").read_text())
    assert merged["complete"] and merged["config"]["eval"]["shard"] == [0, 1]
    for task, family in whole["families"].items():
        assert merged["families"][task]["examples"] == family["examples"] == 4
        for mode, row in family["modes"].items():
            got = merged["families"][task]["modes"][mode]
            assert got["sa_fraction"] == pytest.approx(row["sa_fraction"])
            assert got["work_saved"] == pytest.approx(row["work_saved"])
            if "outcomes" in row:
                assert got["outcomes"] == row["outcomes"] and got["ci95"] == row["ci95"]
            else:
                assert got["perplexity"] == pytest.approx(row["perplexity"], rel=1e-4)
                assert got["target_tokens"] == row["target_tokens"]
                assert got["nll"] == pytest.approx(row["nll"], rel=1e-4)
                assert got["ci95"] == pytest.approx(row["ci95"], rel=1e-3)
    assert _fluxc("eval", "--merge", shards[0], shards[0], "--out", str(tmp_path / "bad")) == 2
    assert "repeat or disagree" in capsys.readouterr().err
    # modes split between runs: full attention in the two shards, all-sparse in one run (the files edited so)
    parts = []
    for name, doc, drop in [(f"f{i}", json.loads(pathlib.Path(p).read_text()), "sparse") for i, p in enumerate(shards)] \
            + [("sp", json.loads((tmp_path / "whole" / "eval.json").read_text()), "full")]:
        for family in doc["families"].values():
            del family["modes"][drop]
        doc["config"]["eval"]["modes"] = ["sparse" if drop == "full" else "full"]
        parts.append(tmp_path / f"{name}.json")
        parts[-1].write_text(json.dumps(doc))
    assert _fluxc("eval", "--merge", *map(str, parts), "--out", str(tmp_path / "mixed")) == 0
    mixed = json.loads((tmp_path / "mixed" / "eval.json").read_text())
    assert mixed["complete"] and mixed["config"]["eval"]["modes"] == ["full", "sparse"]
    for task, family in whole["families"].items():
        for mode, row in family["modes"].items():
            got = mixed["families"][task]["modes"][mode]
            key = "outcomes" if "outcomes" in row else "target_tokens"
            assert got[key] == row[key] and got["ci95"] == pytest.approx(row["ci95"], rel=1e-3), (task, mode)
    assert _fluxc("eval", "--merge", str(parts[0]), str(parts[2]), "--out", str(tmp_path / "part")) == 0
    assert "merged 2 shard(s) (INCOMPLETE)" in capsys.readouterr().out
    assert _fluxc("eval", "--config", "tiny", "--set", "eval.shard=[2,2]", "--out", str(tmp_path / "x")) == 2
    assert "eval.shard=[2, 2] must be [i, n]" in capsys.readouterr().err
