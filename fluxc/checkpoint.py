"""Router checkpoints: fluxc's own format and the released Flux Attention layout.

fluxc format: one safetensors file; tensors ``layers.{i}.{feature|head}.{k}.{weight|bias}``; metadata key
``fluxc`` holds a JSON header: format version, model fingerprint, the FluxConfig method fields and training
provenance. Headers are read and checked before any tensor is loaded.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fluxc.config import FluxConfig
from fluxc.errors import CheckpointError, CheckpointMismatchError, ConfigError, CorruptCheckpointError
from fluxc.ops.router import ROUTER_PARAM_NAMES, LayerRouter

FORMAT = "fluxc-router"
FORMAT_VERSION = 1

_RELEASED = re.compile(r"^(?P<prefix>.*?)\.?mask_allocator\.(?P<part>cls_feat_extractor|cls_router_head_agnostic)"
                       r"\.(?P<idx>\d)\.(?P<kind>weight|bias)$")
_RELEASED_PART = {"cls_feat_extractor": "feature", "cls_router_head_agnostic": "head"}


@dataclass(frozen=True)
class Fingerprint:
    """What a router checkpoint was made for."""

    architecture: str
    num_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        try:
            return cls(**{k: data[k] for k in ("architecture", "num_layers", "q_heads", "kv_heads", "head_dim")})
        except (KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"router checkpoint fingerprint is incomplete: {data!r}") from exc

    def mismatches(self, other: Fingerprint, *, check_architecture: bool = True) -> list[str]:
        fields = ["num_layers", "q_heads", "kv_heads", "head_dim"] + (["architecture"] if check_architecture else [])
        return [f"{f}: checkpoint {getattr(self, f)!r} vs model {getattr(other, f)!r}"
                for f in fields if getattr(self, f) != getattr(other, f)]


@dataclass
class RouterCheckpoint:
    """A router checkpoint whose header has been read; tensors are loaded by `load_routers`."""

    path: str
    files: list[str]
    layout: str  # "fluxc" | "released"
    fingerprint: Fingerprint | None
    config: FluxConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    tensor_names: dict[str, tuple[str, str]] = field(default_factory=dict)  # our name -> (file, stored name)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len({name.split(".")[1] for name in self.tensor_names})

    def check_model(self, model_fp: Fingerprint) -> None:
        """Raise `CheckpointMismatchError` naming both sides when the checkpoint does not fit."""
        if self.fingerprint is None:
            theirs = Fingerprint(model_fp.architecture, self.num_layers, model_fp.q_heads, model_fp.kv_heads,
                                 self.shapes.get("layers.0.feature.0.weight", (0, model_fp.head_dim))[1])
            problems = theirs.mismatches(model_fp, check_architecture=False)
        else:
            problems = self.fingerprint.mismatches(model_fp)
        if problems:
            raise CheckpointMismatchError(
                f"router checkpoint {self.path!r} does not fit this model ({'; '.join(problems)}); "
                f"use a checkpoint trained for {model_fp.architecture} or train one with `fluxc train`")

    def load_routers(self, device: torch.device | str = "cpu") -> nn.ModuleList:
        from safetensors import safe_open

        routers = nn.ModuleList()
        hidden = self.config.router_hidden
        head_dim = self.shapes["layers.0.feature.0.weight"][1]
        handles: dict[str, Any] = {}
        try:
            for i in range(self.num_layers):
                router = LayerRouter(head_dim, hidden)
                state = {}
                for name in ROUTER_PARAM_NAMES:
                    file, stored = self.tensor_names[f"layers.{i}.{name}"]
                    if file not in handles:
                        handles[file] = safe_open(file, framework="pt")
                    state[name] = handles[file].get_tensor(stored).to(torch.float32)
                router.load_state_dict(state)
                routers.append(router)
        except KeyError as exc:
            raise CorruptCheckpointError(f"router checkpoint {self.path!r} misses tensor {exc}") from exc
        except (OSError, RuntimeError, ValueError) as exc:
            raise CorruptCheckpointError(f"router checkpoint {self.path!r} could not be read: {exc}") from exc
        return routers.to(device)


def _read_header(file: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor entries, metadata) of a safetensors file, checked against the file size; no tensor read."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise CorruptCheckpointError(f"{file!r} is not a safetensors file (only {size} bytes)")
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8 or length > 100_000_000:
                raise CorruptCheckpointError(f"{file!r}: header length {length} exceeds the file ({size} bytes)")
            header = json.loads(fh.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{file!r}: safetensors header is not valid JSON ({exc})") from exc
    metadata = header.pop("__metadata__", {}) or {}
    data_size = size - 8 - length
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{file!r}: tensor {name!r} has no valid data_offsets") from exc
        if not (0 <= begin <= end <= data_size):
            raise CorruptCheckpointError(f"{file!r}: tensor {name!r} lies outside the file (truncated?)")
    return header, metadata


def read_checkpoint(path: str | os.PathLike) -> RouterCheckpoint:
    """Read a router checkpoint header: a fluxc file, or a released Flux Attention folder / safetensors file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"router_ckpt={path!r}: the folder holds no .safetensors file")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise CheckpointError(f"router_ckpt={path!r} does not exist; pass a fluxc router file or a released checkpoint folder")
    headers = [(f, *_read_header(f)) for f in files]
    if len(files) == 1 and "fluxc" in headers[0][2]:
        return _fluxc_checkpoint(path, *headers[0])
    return _released_checkpoint(path, headers)


def _fluxc_checkpoint(path: str, file: str, entries: dict, metadata: dict) -> RouterCheckpoint:
    try:
        info = json.loads(metadata["fluxc"])
    except json.JSONDecodeError as exc:
        raise CorruptCheckpointError(f"{path!r}: fluxc header is not JSON ({exc})") from exc
    if info.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path!r}: format {info.get('format')!r} is not {FORMAT!r}")
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r}: format_version {info.get('format_version')!r} is not supported "
                              f"(this fluxc reads version {FORMAT_VERSION}); upgrade fluxc")
    try:
        config = FluxConfig.from_dict(info["config"])
    except (KeyError, ConfigError) as exc:
        raise CorruptCheckpointError(f"{path!r}: bad config in header: {exc}") from exc
    names = {n: (file, n) for n in entries}
    shapes = {n: tuple(e["shape"]) for n, e in entries.items()}
    ckpt = RouterCheckpoint(path, [file], "fluxc", Fingerprint.from_dict(info.get("fingerprint") or {}), config,
                            info.get("provenance", {}), names, shapes)
    _check_complete(ckpt)
    return ckpt


def _released_checkpoint(path: str, headers: list) -> RouterCheckpoint:
    names: dict[str, tuple[str, str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    prefixes: list[str] = []
    for file, entries, _ in headers:
        for stored, entry in entries.items():
            m = _RELEASED.match(stored)
            if not m:
                continue
            if m["prefix"] not in prefixes:
                prefixes.append(m["prefix"])
            layer = _layer_of(m["prefix"])
            ours = f"layers.{layer}.{_RELEASED_PART[m['part']]}.{m['idx']}.{m['kind']}"
            names[ours] = (file, stored)
            shapes[ours] = tuple(entry["shape"])
    if not names:
        raise CheckpointError(f"router_ckpt={path!r} holds neither a fluxc header nor released router tensors "
                              f"(*.mask_allocator.cls_feat_extractor.*)")
    cfg_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    model_cfg: dict[str, Any] = {}
    if os.path.isfile(cfg_file):
        with open(cfg_file) as fh:
            model_cfg = json.load(fh)
    config = released_config(model_cfg, shapes)
    fingerprint = None
    if {"num_hidden_layers", "num_attention_heads"} <= set(model_cfg):
        heads = model_cfg["num_attention_heads"]
        fingerprint = Fingerprint(
            architecture=(model_cfg.get("architectures") or [model_cfg.get("model_type", "?")])[0],
            num_layers=model_cfg["num_hidden_layers"], q_heads=heads,
            kv_heads=model_cfg.get("num_key_value_heads", heads),
            head_dim=model_cfg.get("head_dim") or model_cfg["hidden_size"] // heads)
    ckpt = RouterCheckpoint(path, [h[0] for h in headers], "released", fingerprint, config,
                            {"source": "released Flux Attention checkpoint"}, names, shapes)
    _check_complete(ckpt)
    return ckpt


def _layer_of(prefix: str) -> int:
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", prefix)
    if not numbers:
        raise CorruptCheckpointError(f"released router tensor prefix {prefix!r} has no layer number")
    return int(numbers[-1])


def released_config(model_cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> FluxConfig:
    """FluxConfig from a released checkpoint's config keys (toggle_type, sink_size, local_window_size, ...) and router tensor shapes."""
    toggle = model_cfg.get("toggle_type", "streaming")
    if toggle not in ("streaming", "triangle"):
        raise CheckpointError(f"released checkpoint toggle_type={toggle!r} is not supported; fluxc runs "
                              f"'streaming' and 'triangle' sparse patterns")
    if model_cfg.get("retrieval_mode", "full") != "full":
        raise CheckpointError(f"released checkpoint retrieval_mode={model_cfg['retrieval_mode']!r} is not "
                              f"supported; fluxc's FA branch is exact full attention")
    if model_cfg.get("pooling_mode", "ctx_q") != "ctx_q":
        raise CheckpointError(f"released checkpoint pooling_mode={model_cfg['pooling_mode']!r} is not supported")
    hidden = (shapes["layers.0.feature.0.weight"][0], shapes["layers.0.feature.2.weight"][0],
              shapes["layers.0.head.0.weight"][0], shapes["layers.0.head.2.weight"][0])
    sink = int(model_cfg.get("sink_size", 128))
    window = int(model_cfg.get("local_window_size", 2048))
    return FluxConfig(pattern=toggle, sink=sink, window=window, block=128,
                      block_exact=sink % 128 == 0 and window % 128 == 0,
                      n_last=int(model_cfg.get("triangle_n_last", 128)),
                      pool_size=int(model_cfg.get("pool_size", 150)), router_hidden=hidden)


def _check_complete(ckpt: RouterCheckpoint) -> None:
    layers = sorted({int(n.split(".")[1]) for n in ckpt.tensor_names})
    if layers != list(range(len(layers))):
        raise CorruptCheckpointError(f"{ckpt.path!r}: router layers {layers} are not 0..{len(layers) - 1}")
    for i in layers:
        missing = [n for n in ROUTER_PARAM_NAMES if f"layers.{i}.{n}" not in ckpt.tensor_names]
        if missing:
            raise CorruptCheckpointError(f"{ckpt.path!r}: layer {i} misses router tensors {missing}")


def save_routers(path: str | os.PathLike, routers: nn.ModuleList, config: FluxConfig, fingerprint: Fingerprint,
                 provenance: dict[str, Any] | None = None) -> None:
    """Write routers in fluxc's format (safetensors + JSON header)."""
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.{name}": p.detach().to("cpu", torch.float32).contiguous()
               for i, r in enumerate(routers) for name, p in r.named_parameters()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fingerprint.to_dict(),
              "config": config.method_dict(), "provenance": provenance or {}}
    save_file(tensors, os.fspath(path), metadata={"fluxc": json.dumps(header, sort_keys=True)})
