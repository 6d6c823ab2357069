"""`FluxConfig`: the typed, versioned, serializable description of a Flux Attention set-up."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from fluxc.errors import ConfigError
from fluxc.patterns import pattern_problem

CONFIG_VERSION = 1

Pattern = Literal["streaming", "triangle"]
Implementation = Literal["auto", "reference", "triton", "flex", "fa4"]
Compiler = Literal["inductor", "eager"]

_IMPLS = ("auto", "reference", "triton", "flex", "fa4")
_COMPILERS = ("inductor", "eager")


@dataclass(frozen=True)
class FluxConfig:
    """How the sparse branch, the router and the lowering are set up.

    Attributes:
        pattern: sparse-attention pattern of the SA branch: "streaming" (sinks + local window) or
            "triangle" (streaming, plus dense attention for the last ``n_last`` prompt queries).
        sink: number of attention-sink tokens at the start of each sequence.
        window: local window, in tokens.
        block: block granularity of block-exact windows.
        block_exact: True for the block-exact rule of the released code, False for token-exact.
        n_last: number of dense last queries of the triangle pattern (prefill only).
        pool_size: P, the first and last P prompt tokens the router pools over.
        router_hidden: widths of the router MLP: feature (h1, h2) then head (h3, h4).
        impl: routed-attention implementation: "auto" (flash-attn-4 where it runs, else Triton, on CUDA; the
            reference on CPU), "reference" (plain PyTorch), "triton", "flex", "fa4" (flash-attn-4 runs prefill
            batches routed all-full; the Triton kernels the rest).
        compiler: what compiles the rewritten graph: "inductor" or "eager" (run the FX graph as is).
    """

    pattern: Pattern = "streaming"
    sink: int = 128
    window: int = 2048
    block: int = 128
    block_exact: bool = True
    n_last: int = 128
    pool_size: int = 150
    router_hidden: tuple[int, int, int, int] = (1024, 256, 512, 128)
    impl: Implementation = "auto"
    compiler: Compiler = "inductor"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        problem = pattern_problem(pattern=self.pattern, sink=self.sink, window=self.window, block=self.block,
                                  block_exact=self.block_exact, n_last=self.n_last)
        if problem is not None:
            raise ConfigError(f"FluxConfig.{problem}")
        if not isinstance(self.block_exact, bool):
            raise ConfigError(f"FluxConfig.block_exact={self.block_exact!r} must be True or False")
        if self.impl not in _IMPLS:
            raise ConfigError(f"FluxConfig.impl={self.impl!r} is unknown; use one of {_IMPLS}")
        if self.compiler not in _COMPILERS:
            raise ConfigError(f"FluxConfig.compiler={self.compiler!r} is unknown; use one of {_COMPILERS}")
        if not isinstance(self.pool_size, int) or isinstance(self.pool_size, bool) or self.pool_size < 1:
            raise ConfigError(f"FluxConfig.pool_size={self.pool_size!r} must be an int >= 1")
        hidden = tuple(self.router_hidden) if isinstance(self.router_hidden, (list, tuple)) else ()
        if len(hidden) != 4 or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ConfigError(
                f"FluxConfig.router_hidden={self.router_hidden!r} must be four positive ints (h1, h2, h3, h4)"
            )
        object.__setattr__(self, "router_hidden", hidden)
        if self.version != CONFIG_VERSION:
            raise ConfigError(
                f"FluxConfig.version={self.version!r} is not supported by this fluxc (version {CONFIG_VERSION})"
            )

    # Fields that change what the model computes (stored with router checkpoints).
    METHOD_FIELDS = ("pattern", "sink", "window", "block", "block_exact", "n_last", "pool_size", "router_hidden")

    def replace(self, **changes: Any) -> FluxConfig:
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"FluxConfig has no field(s) {sorted(unknown)}; known: {self.field_names()}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["router_hidden"] = list(self.router_hidden)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FluxConfig:
        """Build from a dict; unknown keys are an error (nothing is silently ignored)."""
        if not isinstance(data, dict):
            raise ConfigError(f"FluxConfig.from_dict expects a dict, got {type(data).__name__}")
        unknown = set(data) - set(cls.field_names())
        if unknown:
            raise ConfigError(f"unknown FluxConfig field(s) {sorted(unknown)}; known: {cls.field_names()}")
        data = dict(data)
        if "router_hidden" in data:
            data["router_hidden"] = tuple(data["router_hidden"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FluxConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"FluxConfig.from_json: not JSON ({exc})") from exc
        return cls.from_dict(data)

    def method_dict(self) -> dict[str, Any]:
        """The fields that change the model's output (router checkpoints record these)."""
        d = self.to_dict()
        return {k: d[k] for k in self.METHOD_FIELDS}
