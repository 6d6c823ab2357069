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
            fp = cls(**{k: data[k] for k in ("architecture", "num_layers", "q_heads", "kv_heads", "head_dim")})
        except (KeyError, TypeError) as exc:
            raise CorruptCheckpointError(f"router checkpoint fingerprint is incomplete: {data!r}") from exc
        sizes = (fp.num_layers, fp.q_heads, fp.kv_heads, fp.head_dim)
        if not isinstance(fp.architecture, str) or any(isinstance(v, bool) or not isinstance(v, int) for v in sizes):
            raise CorruptCheckpointError(f"router checkpoint fingerprint {data!r} is not a name and four sizes")
        return fp

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
                    if not bool(torch.isfinite(state[name]).all()):
                        raise CorruptCheckpointError(f"router checkpoint {self.path!r}: tensor {stored!r} holds NaN "
                                                     f"or infinite values; retrain the routers or use another file")
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
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{file!r}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(f"{file!r}: the safetensors metadata is not a JSON object")
    data_size = size - 8 - length
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            shape = [int(d) for d in entry["shape"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"{file!r}: tensor {name!r} has no valid data_offsets / shape") from exc
        if not (0 <= begin <= end <= data_size) or any(d < 0 for d in shape):
            raise CorruptCheckpointError(f"{file!r}: tensor {name!r} lies outside the file (truncated?)")
    return header, metadata


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _check_router_dtypes(path: str, entries: dict[str, tuple[dict, str]]) -> None:
    """Router weights are floating point: an integer tensor is another file, not routers to cast silently."""
    for entry, stored in entries.values():
        if entry.get("dtype") not in _FLOAT_DTYPES:
            raise CorruptCheckpointError(f"router checkpoint {path!r}: tensor {stored!r} has dtype "
                                         f"{entry.get('dtype')!r}; router weights are {'/'.join(_FLOAT_DTYPES)}")


def read_checkpoint(path: str | os.PathLike) -> RouterCheckpoint:
    """Read a router checkpoint header: a fluxc file, or a released Flux Attention folder / safetensors file."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"router_ckpt={path!r} is not a path; pass the path of a fluxc router file or a "
                              f"released checkpoint folder (or None with route='full' / 'sparse')")
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
    if not isinstance(info, dict):
        raise CorruptCheckpointError(f"{path!r}: the fluxc header is not a JSON object")
    if info.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path!r}: format {info.get('format')!r} is not {FORMAT!r}")
    if info.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r}: format_version {info.get('format_version')!r} is not supported "
                              f"(this fluxc reads version {FORMAT_VERSION}); upgrade fluxc")
    try:
        config = FluxConfig.from_dict(info["config"])
    except (KeyError, ConfigError) as exc:
        raise CorruptCheckpointError(f"{path!r}: bad config in header: {exc}") from exc
    pattern = re.compile(r"^layers\.\d+\.(" + "|".join(re.escape(n) for n in ROUTER_PARAM_NAMES) + r")$")
    unknown = sorted(n for n in entries if not pattern.match(n))
    if unknown:
        raise CorruptCheckpointError(f"{path!r}: tensors {unknown[:5]} are not router weights "
                                     f"(layers.<i>.{{feature|head}}.<k>.{{weight|bias}}); is this a fluxc router file?")
    _check_router_dtypes(path, {n: (e, n) for n, e in entries.items()})
    names = {n: (file, n) for n in entries}
    shapes = {n: tuple(e["shape"]) for n, e in entries.items()}
    try:
        fingerprint = Fingerprint.from_dict(info.get("fingerprint") or {})
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{path!r}: {exc}; re-save the routers with fluxc.save_routers") from None
    ckpt = RouterCheckpoint(path, [file], "fluxc", fingerprint, config, info.get("provenance", {}), names, shapes)
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
            _check_router_dtypes(path, {ours: (entry, stored)})
    if not names:
        raise CheckpointError(f"router_ckpt={path!r} holds neither a fluxc header nor released router tensors "
                              f"(*.mask_allocator.cls_feat_extractor.*)")
    _check_tensors(path, names)  # the config reads layer 0's shapes
    cfg_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    model_cfg: dict[str, Any] = {}
    if os.path.isfile(cfg_file):
        try:
            with open(cfg_file) as fh:
                model_cfg = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptCheckpointError(f"{cfg_file!r} is not a readable JSON model config ({exc})") from None
        if not isinstance(model_cfg, dict):
            raise CorruptCheckpointError(f"{cfg_file!r} is not a JSON object")
    try:
        config = released_config(model_cfg, shapes)
        fingerprint = _released_fingerprint(model_cfg)
    except CheckpointError as exc:  # a setting fluxc does not run
        raise type(exc)(f"router_ckpt={path!r}: {exc}") from None
    except (ConfigError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"router_ckpt={path!r}: {cfg_file!r} does not describe a usable model: {exc}; "
                                     f"fix config.json or use fluxc's router format") from None
    ckpt = RouterCheckpoint(path, [h[0] for h in headers], "released", fingerprint, config,
                            {"source": "released Flux Attention checkpoint"}, names, shapes)
    _check_complete(ckpt)
    return ckpt


def _released_fingerprint(model_cfg: dict[str, Any]) -> Fingerprint | None:
    if not {"num_hidden_layers", "num_attention_heads"} <= set(model_cfg):
        return None
    heads = _positive(model_cfg, "num_attention_heads")
    head_dim = model_cfg.get("head_dim")
    architectures = model_cfg.get("architectures") or [model_cfg.get("model_type", "?")]
    return Fingerprint(
        architecture=str(architectures[0]) if isinstance(architectures, list) else str(architectures),
        num_layers=_positive(model_cfg, "num_hidden_layers"), q_heads=heads,
        kv_heads=_positive(model_cfg, "num_key_value_heads", heads),
        head_dim=_positive(model_cfg, "head_dim") if head_dim else _positive(model_cfg, "hidden_size") // heads)


def _positive(model_cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    value = model_cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} is not a positive int")
    return value


def _int_key(model_cfg: dict[str, Any], key: str, default: int) -> int:
    value = model_cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}={value!r} is not an int")
    return value


def _layer_of(prefix: str) -> int:
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.|$)", prefix)
    if not numbers:
        raise CorruptCheckpointError(f"released router tensor prefix {prefix!r} has no layer number")
    return int(numbers[-1])


def released_config(model_cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> FluxConfig:
    """FluxConfig from a released checkpoint's config keys (toggle_type, sink_size, local_window_size, ...) and router tensor shapes."""
    toggle = model_cfg.get("toggle_type", "streaming")
    if not isinstance(toggle, str) or toggle not in ("streaming", "triangle"):
        raise CheckpointError(f"released checkpoint toggle_type={toggle!r} is not supported; fluxc runs "
                              f"'streaming' and 'triangle' sparse patterns")
    if model_cfg.get("retrieval_mode", "full") != "full":
        raise CheckpointError(f"released checkpoint retrieval_mode={model_cfg['retrieval_mode']!r} is not "
                              f"supported; fluxc's FA branch is exact full attention")
    if model_cfg.get("pooling_mode", "ctx_q") != "ctx_q":
        raise CheckpointError(f"released checkpoint pooling_mode={model_cfg['pooling_mode']!r} is not supported")
    hidden = (shapes["layers.0.feature.0.weight"][0], shapes["layers.0.feature.2.weight"][0],
              shapes["layers.0.head.0.weight"][0], shapes["layers.0.head.2.weight"][0])
    sink = _int_key(model_cfg, "sink_size", 128)
    window = _int_key(model_cfg, "local_window_size", 2048)
    return FluxConfig(pattern=toggle, sink=sink, window=window, block=128,
                      block_exact=sink % 128 == 0 and window % 128 == 0,
                      n_last=_int_key(model_cfg, "triangle_n_last", 128),
                      pool_size=_int_key(model_cfg, "pool_size", 150), router_hidden=hidden)


def _check_complete(ckpt: RouterCheckpoint) -> None:
    _check_tensors(ckpt.path, ckpt.tensor_names)


def _check_tensors(path: str, names: dict[str, Any]) -> None:
    """Every layer 0..n-1 holds every router tensor."""
    layers = sorted({int(n.split(".")[1]) for n in names})
    if layers != list(range(len(layers))):
        raise CorruptCheckpointError(f"{path!r}: router layers {layers} are not 0..{len(layers) - 1}")
    for i in layers:
        missing = [n for n in ROUTER_PARAM_NAMES if f"layers.{i}.{n}" not in names]
        if missing:
            raise CorruptCheckpointError(f"{path!r}: layer {i} misses router tensors {missing}")


def save_routers(path: str | os.PathLike, routers: nn.ModuleList, config: FluxConfig, fingerprint: Fingerprint,
                 provenance: dict[str, Any] | None = None) -> None:
    """Write routers in fluxc's format (safetensors + JSON header)."""
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.{name}": p.detach().to("cpu", torch.float32).contiguous()
               for i, r in enumerate(routers) for name, p in r.named_parameters()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fingerprint.to_dict(),
              "config": config.method_dict(), "provenance": provenance or {}}
    save_file(tensors, os.fspath(path), metadata={"fluxc": json.dumps(header, sort_keys=True)})


def fold_operating_point(path: str | os.PathLike, out: str | os.PathLike, threshold: float, chosen_on: str) -> None:
    """Write the routers of `path` to `out` (fluxc's format) with the operating point `threshold` folded into each
    router's last bias: the folded routers at threshold 0.5 (`fluxc.compile`'s default) route exactly as the
    originals at `threshold`. `chosen_on` says what data picked it; both go into the provenance."""
    import math

    if not (isinstance(threshold, float) and 0.0 < threshold < 1.0):
        raise ConfigError(f"threshold={threshold!r} must be a float in (0, 1), the probability of full attention "
                          f"above which a layer runs full")
    ckpt = read_checkpoint(path)
    if ckpt.fingerprint is None:
        raise CheckpointError(f"router checkpoint {ckpt.path!r} has no model fingerprint (the released layout); "
                              f"convert it by loading it with fluxc.compile and training or saving with fluxc first")
    routers = ckpt.load_routers()
    shift = math.log(threshold / (1.0 - threshold))  # p_full > t  <=>  logit_full - logit_sparse > logit(t)
    with torch.no_grad():
        for router in routers:
            router.head[4].bias[1] -= shift
    provenance = dict(ckpt.provenance)
    provenance["operating_point"] = {"threshold": threshold, "folded_into": "head.4.bias[1]", "chosen_on": chosen_on,
                                     "from": os.fspath(path)}
    save_routers(out, routers, ckpt.config, ckpt.fingerprint, provenance)
