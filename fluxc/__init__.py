"""fluxc: Flux Attention as a torch.compile pass.

    model = fluxc.compile(model, router_ckpt)        # or route="full" / "sparse" / per-layer
    torch.compile(model, backend="flux", options={"router_ckpt": ...})

Importing fluxc registers its custom ops and nothing else: no CUDA init, no Triton import, no changes to
logging, environment or torch configuration.
"""

import importlib

from fluxc.api import FluxModule, compile, last_route, last_route_margins, sites
from fluxc.checkpoint import Fingerprint, read_checkpoint, save_routers
from fluxc.config import FluxConfig
from fluxc.errors import (
    CapacityError,
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    CorruptCheckpointError,
    ExportError,
    FluxError,
    ImplementationError,
    MaskError,
    NoAttentionError,
    NotTracedError,
    RecompileLimitError,
    RequestError,
    RouteError,
)
from fluxc.passes import RouteState, SiteInfo
from fluxc.version import __version__

# Serving and export import transformers (and export, on use, onnx and Inductor): loaded on first use, so that
# `import fluxc` stays cheap and free of side effects.
_LAZY = {
    "DecodeEngine": "fluxc.serve.engine", "FluxCache": "fluxc.serve.cache", "SamplingConfig": "fluxc.serve.sampling",
    "generate": "fluxc.serve.generate",
    "export": "fluxc.exporter.program", "export_aoti": "fluxc.exporter.program", "export_onnx": "fluxc.exporter.program",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fluxc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "CapacityError", "CheckpointError", "CheckpointMismatchError", "RecompileLimitError", "RequestError", "DecodeEngine", "FluxCache", "SamplingConfig", "ConfigError", "CorruptCheckpointError", "Fingerprint",
    "FluxConfig", "FluxError", "FluxModule", "ImplementationError", "MaskError", "NoAttentionError", "NotTracedError",
    "RouteError", "RouteState", "SiteInfo", "compile", "generate", "last_route", "last_route_margins", "read_checkpoint",
    "save_routers", "sites", "__version__", "ExportError", "export", "export_aoti", "export_onnx",
]
