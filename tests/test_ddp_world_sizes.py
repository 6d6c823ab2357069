"""Data-parallel router training on CPU (gloo, torchrun): the same global batch and Gumbel draws on any number of
processes, so two processes follow one process's loss curve; a checkpoint saved by two processes resumes on one
and on two with the same next-step loss; only process 0 writes; a stuck process ends the run with a timeout
error instead of a hang, and the run resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fluxc
from fluxc.training import load_run_config
from fluxc.training.batches import training_example
from fluxc.training.config import parse_override
from fluxc.training.models import ByteTokenizer

HERE = Path(__file__).resolve().parent
FAST = ["--set", 'data.tasks=["passkey","lm"]', "--set", "data.lengths=[256]", "--set", "data.batch_size=2",
        "--set", "run.eval_every=0", "--set", "run.save_every=1", "--set", "run.preflight=false"]


def _fluxc(*argv: str) -> int:
    import fluxc.cli

    return fluxc.cli.main(list(argv))


def _torchrun(script: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free loopback port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={port}", *script],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "step" in r]
    assert len(steps) == len(set(steps)), steps  # one writer: process 0
    return {r["step"]: r["loss"] for r in rows if "step" in r}


def test_the_global_batch_is_the_same_on_any_number_of_processes():
    cfg = load_run_config("tiny", [parse_override("data.batch_size=4")])
    tok = ByteTokenizer()
    for step in (0, 3):
        one = [training_example(cfg, tok, step, i) for i in range(4)]
        for world in (2, 4):
            many = [training_example(cfg, tok, step, i, rank, world) for rank in range(world)
                    for i in range(4 // world)]
            assert [e.input_ids for e in many] == [e.input_ids for e in one]
    with pytest.raises(fluxc.ConfigError, match="data.batch_size=4 is the global batch.*3 processes"):
        training_example(cfg, tok, 0, 0, 0, 3)


def test_two_processes_follow_one_and_resume_across_world_sizes(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    run = _torchrun(["-m", "fluxc.cli", "train", "--config", "tiny", "--out", str(two), "--steps", "2", *FAST])
    assert run.returncode == 0, run.stderr[-3000:]
    assert _fluxc("train", "--config", "tiny", "--out", str(one), "--steps", "2", *FAST) == 0
    curve_two, curve_one = _losses(two), _losses(one)
    assert sorted(curve_two) == [1, 2]
    for step in (1, 2):  # same global batch, same Gumbel draws: the same losses, to float rounding
        assert curve_two[step] == pytest.approx(curve_one[step], rel=1e-4), (step, curve_two, curve_one)
    assert fluxc.read_checkpoint(two / "routers.safetensors").provenance["world_size"] == 2

    # the checkpoint of two processes resumes on one and on two: the same next-step loss and routers
    again = tmp_path / "two-again"
    shutil.copytree(two, again)
    assert _fluxc("train", "--config", "tiny", "--out", str(two), "--steps", "3", "--resume", *FAST) == 0
    run = _torchrun(["-m", "fluxc.cli", "train", "--config", "tiny", "--out", str(again), "--steps", "3", "--resume",
                     *FAST])
    assert run.returncode == 0, run.stderr[-3000:]
    assert _losses(again)[3] == pytest.approx(_losses(two)[3], rel=1e-4)
    a = fluxc.read_checkpoint(two / "routers.safetensors").load_routers(torch.device("cpu"))
    b = fluxc.read_checkpoint(again / "routers.safetensors").load_routers(torch.device("cpu"))
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in two.iterdir())


def test_a_stuck_process_ends_the_run_with_a_timeout_and_it_resumes(tmp_path):
    out = tmp_path / "run"
    run = _torchrun([str(HERE / "_ddp_hang_worker.py"), "train", "--config", "tiny", "--out", str(out),
                     "--steps", "3", *FAST, "--set", "run.collective_timeout_s=15"], timeout=240)
    assert run.returncode != 0
    assert "hanging at step 2" in run.stdout and "imed out" in run.stderr + run.stdout, run.stderr[-3000:]
    assert fluxc.read_checkpoint(out / "routers.safetensors").provenance["step"] == 1  # saved before the hang
    assert _fluxc("train", "--config", "tiny", "--out", str(out), "--steps", "3", "--resume", *FAST) == 0
    assert sorted(_losses(out)) == [1, 2, 3]
