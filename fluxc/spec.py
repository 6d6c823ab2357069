"""`SiteSpec`: the static facts of one attention site, as one object across the custom-op boundary.

The graph pass builds one per routed site (how the model computes that attention, and which SA pattern and
implementation its sparse branch runs); the ops, their fake and backward implementations, the kernels'
dispatch, the export pass and the ONNX translation all read the same object. torch.library schemas take no
Python objects, so a spec crosses the op boundary as its canonical text (`encode`), which Dynamo,
Inductor, `torch.export`, AOTInductor and ONNX keep as a constant; `decode` is cached.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fluxc.errors import ConfigError
from fluxc.patterns import pattern_problem

if TYPE_CHECKING:
    from fluxc.config import FluxConfig

MATHS = ("sdpa", "eager")
IMPLS = ("auto", "reference", "triton", "flex", "fa4")


@dataclass(frozen=True)
class SiteSpec:
    """One routed attention site.

    The model's own attention: `is_causal` (SDPA's flag; with a key mask, a structural causal mask),
    `scale`, `softcap` (0: none), `math` ("sdpa" or "eager": which reference computes the FA branch exactly
    as the model did), `softmax_fp32`, `bottom_right` (flash-attn's causal alignment), `native_window`
    (the model's own sliding window, 0: none). The sparse branch: `pattern`, `sink`, `window`, `block`,
    `block_exact`, `n_last` (`fluxc.patterns`). `impl`: "auto", "reference", "triton", "flex" or "fa4".
    """

    is_causal: bool = False
    scale: float = 1.0
    softcap: float = 0.0
    math: str = "sdpa"
    softmax_fp32: bool = True
    bottom_right: bool = False
    native_window: int = 0
    pattern: str = "streaming"
    sink: int = 128
    window: int = 2048
    block: int = 128
    block_exact: bool = True
    n_last: int = 128
    impl: str = "auto"

    def __post_init__(self) -> None:
        problem = pattern_problem(pattern=self.pattern, sink=self.sink, window=self.window, block=self.block,
                                  block_exact=self.block_exact, n_last=self.n_last)
        if problem is not None:
            raise ConfigError(f"SiteSpec.{problem}")
        if self.math not in MATHS:
            raise ConfigError(f"SiteSpec.math={self.math!r} is unknown; use one of {MATHS}")
        if self.impl not in IMPLS:
            raise ConfigError(f"SiteSpec.impl={self.impl!r} is unknown; use one of {IMPLS}")
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "softcap", float(self.softcap))

    @classmethod
    def for_config(cls, config: FluxConfig, **site: Any) -> SiteSpec:
        """A site's spec: its own facts (`site`) with the SA pattern and implementation of `config`."""
        return cls(pattern=config.pattern, sink=config.sink, window=config.window, block=config.block,
                   block_exact=config.block_exact, n_last=config.n_last, impl=config.impl, **site)

    @property
    def rule(self) -> dict[str, Any]:
        """The SA rule's parameters, as `fluxc.patterns` and the kernels take them."""
        return dict(sink=self.sink, window=self.window, block=self.block, block_exact=self.block_exact)

    def replace(self, **changes: Any) -> SiteSpec:
        return dataclasses.replace(self, **changes)

    def encode(self) -> str:
        """Canonical text `name=value;...` (fields sorted, values as Python literals): the form the custom ops
        take. Plain string formatting, so that Dynamo folds it to a constant when a spec is built while it
        traces (the cache of an exported decode step)."""
        return ";".join([f"{name}={getattr(self, name)!r}" for name in _FIELDS])

    @staticmethod
    def decode(text: str) -> SiteSpec:
        """The spec of `encode`'s text (cached: ops decode the same few strings at every call)."""
        return _decode(text)


_FIELDS = tuple(sorted(f.name for f in dataclasses.fields(SiteSpec)))


@functools.lru_cache(maxsize=1024)
def _decode(text: str) -> SiteSpec:
    try:
        fields = {name: ast.literal_eval(value) for name, value in (item.split("=", 1) for item in text.split(";"))}
    except (AttributeError, ValueError, SyntaxError) as exc:
        raise ConfigError(f"spec={text!r} is not a SiteSpec encoding; build it with SiteSpec(...).encode()") from exc
    unknown = set(fields) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"spec={text!r} has fields {sorted(unknown)} that SiteSpec does not know; build it with "
                          f"SiteSpec(...).encode()")
    return SiteSpec(**fields)
