"""A training run's resume state (optimiser states, multipliers, RNG) as safetensors + JSON: no pickle, so a run
folder from someone else cannot execute code when resumed.

The state is a tree of dicts, lists, tuples, numbers, strings and tensors. Tensors go into the safetensors file
under their path in the tree; the tree itself, with each tensor replaced by its key, is JSON in the file's
metadata. Dict keys keep their type (an optimiser's state is keyed by parameter index).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluxc.errors import CheckpointError, CorruptCheckpointError

FORMAT = "fluxc-train-state/1"
SUFFIX = ".state.safetensors"
PICKLED_SUFFIX = ".state.pt"  # what fluxc wrote before: refused, never unpickled


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, f"{key}.k{i}", tensors), _encode(v, f"{key}.{i}", tensors)]
                         for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, f"{key}.{i}", tensors)
                                                                  for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise CheckpointError(f"cannot store a {type(value).__name__} in a training state (tensors, numbers, strings, "
                          f"lists and dicts only)")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise CorruptCheckpointError(f"training state: unexpected node {str(node)[:80]!r}")
    (kind, body), = node.items()
    if kind == "tensor":
        if body not in tensors:
            raise CorruptCheckpointError(f"training state: tensor {body!r} is missing")
        return tensors[body]
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
    if kind in ("list", "tuple"):
        items = [_decode(v, tensors) for v in body]
        return tuple(items) if kind == "tuple" else items
    if kind == "value" and (body is None or isinstance(body, (bool, int, float, str))):
        return body
    raise CorruptCheckpointError(f"training state: unknown node kind {kind!r}")


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` (a .safetensors file)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, "state", tensors)
    save_file(tensors, str(path), metadata={"format": FORMAT, "tree": json.dumps(tree)})


def load_state(path: str | Path) -> dict[str, Any]:
    """The state `save_state` wrote; a damaged or foreign file is a CheckpointError (nothing is executed)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001  (safetensors raises several types for a bad header)
        raise CorruptCheckpointError(f"{path} is not a readable training state ({type(exc).__name__}: {exc}); "
                                     f"delete it and start the run over, or resume from an intact run folder") from None
    if meta.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path} is not a fluxc training state (format {meta.get('format')!r}, "
                                     f"expected {FORMAT!r})")
    try:
        tree = json.loads(meta["tree"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: its state tree is damaged ({exc})") from None
    try:
        state = _decode(tree, tensors)
    except (TypeError, ValueError, RecursionError) as exc:  # an unhashable key, a tree nested without end
        raise CorruptCheckpointError(f"{path}: its state tree is damaged ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path}: the training state is not a mapping")
    return state


def refuse_pickled(routers_path: str | Path) -> None:
    """A `.state.pt` beside a router file is a pickle from an older fluxc: say so instead of loading it."""
    pickled = Path(f"{routers_path}{PICKLED_SUFFIX}")
    if pickled.exists() and not Path(f"{routers_path}{SUFFIX}").exists():
        raise CheckpointError(f"{pickled} is a pickled training state (fluxc before 0.2); fluxc never unpickles "
                              f"files it is given: start the run over (the router file itself still loads)")
