"""fluxc: Flux Attention as a torch.compile pass.

    model = fluxc.compile(model, router_ckpt)        # or route="full" / "sparse" / per-layer
    torch.compile(model, backend="flux", options={"router_ckpt": ...})

Importing fluxc registers its custom ops and nothing else: no CUDA init, no Triton import, no changes to
logging, environment or torch configuration.
"""

from fluxc.api import FluxModule, compile, last_route, sites
from fluxc.checkpoint import Fingerprint, read_checkpoint, save_routers
from fluxc.config import FluxConfig
from fluxc.errors import (
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
    RouteError,
)
from fluxc.export import export, export_aoti, export_onnx  # cheap: onnx, onnxscript and Inductor load on use
from fluxc.generate import generate
from fluxc.passes import RouteState, SiteInfo

__version__ = "0.1.0"

_LAZY = {"DecodeEngine": "fluxc.engine", "FluxCache": "fluxc.engine", "SamplingConfig": "fluxc.engine"}


def __getattr__(name: str):  # the engine imports transformers: loaded on first use, not by `import fluxc`
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fluxc' has no attribute {name!r}")

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "DecodeEngine", "FluxCache", "SamplingConfig", "ConfigError", "CorruptCheckpointError", "Fingerprint",
    "FluxConfig", "FluxError", "FluxModule", "ImplementationError", "MaskError", "NoAttentionError", "NotTracedError",
    "RouteError", "RouteState", "SiteInfo", "compile", "generate", "last_route", "read_checkpoint",
    "save_routers", "sites", "ExportError", "export", "export_aoti", "export_onnx",
]
