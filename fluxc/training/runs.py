"""The runs index: one JSON line per `fluxc train` and `fluxc eval`, so a result can be traced to its config,
commit, command and curves and reproduced (`run.index`: "auto", the default, is ``index.jsonl`` in the folder
that holds `run.out`, e.g. ``runs/index.jsonl`` for ``runs/smollm2``; empty turns it off)."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from fluxc.training.config import RunConfig


def host_provenance(device: Any) -> dict[str, Any]:
    """Versions, platform and device (the GPU's name on CUDA) of this process."""
    import platform

    import torch
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_provenance(device: Any) -> dict[str, Any]:
    """This run's own record: command, UTC date, commit and host."""
    return {"command": list(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_state(), "host": host_provenance(device)}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def git_state() -> dict[str, Any]:
    """The checkout's commit; ``$FLUXC_COMMIT`` where the copy has no .git (as on the GPU machine)."""
    if os.environ.get("FLUXC_COMMIT"):
        return {"commit": os.environ["FLUXC_COMMIT"], "from": "FLUXC_COMMIT"}
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    if head.returncode != 0:
        return {"commit": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def record_run(cfg: RunConfig, kind: str, **fields: Any) -> Path | None:
    """Append one entry (`kind`: "train" or "eval") to `cfg.run.index`; returns its path (None: turned off)."""
    if not cfg.run.index:
        return None
    path = Path(cfg.run.out).parent / "index.jsonl" if cfg.run.index == "auto" else Path(cfg.run.index)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"kind": kind, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "out": cfg.run.out, "command": sys.argv, **fields, "config": cfg.to_dict()}
    entry.setdefault("git", git_state())
    with open(path, "a", encoding="utf-8") as fh:  # one write per line: entries never interleave mid-line
        fh.write(json.dumps(entry, default=str) + "\n")
    return path


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """The entries of a runs index, oldest first."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
