"""The public contract, fuzzed (hypothesis): every argument a user passes -- FluxConfig fields, fluxc.compile
arguments and routes, model inputs (ids, masks, dtypes, devices), fluxc.generate / engine arguments, router
files in fluxc's and the released layout, mangled every way -- either works or ends in a FluxError subclass
whose message names the argument or file. Never a crash from deep inside, a hang or a silent acceptance."""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_checkpoint import _released_folder

import fluxc
from fluxc.api import model_fingerprint

from hf_models import tiny_model

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
HEAVY = settings(FUZZ, max_examples=25)
VOCAB = 128

junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(2**70), 2**70),
                 st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.binary(max_size=4),
                 st.lists(st.integers(-2, 3), max_size=5), st.tuples(st.integers(-2, 64)), st.just(torch.ones(2)))

json_junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(-(2**70), 2**70),
                      st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                      st.lists(st.integers(-2, 3), max_size=5))


def _clear(exc: BaseException, *names: str) -> None:
    """A FluxError whose message names each of `names` (the argument, the value or the file)."""
    assert isinstance(exc, fluxc.FluxError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


# --- FluxConfig
FIELD_VALUES = {
    "pattern": st.one_of(st.sampled_from(["streaming", "triangle"]), junk),
    "sink": st.one_of(st.integers(0, 300), junk), "window": st.one_of(st.integers(1, 5000), junk),
    "block": st.one_of(st.sampled_from([16, 64, 128]), junk), "block_exact": st.one_of(st.booleans(), junk),
    "n_last": st.one_of(st.integers(1, 300), junk), "pool_size": st.one_of(st.integers(1, 300), junk),
    "router_hidden": st.one_of(st.tuples(*[st.integers(1, 64)] * 4), junk),
    "impl": st.one_of(st.sampled_from(["auto", "reference", "flex", "triton"]), junk),
    "compiler": st.one_of(st.sampled_from(["inductor", "eager"]), junk),
}


@FUZZ
@given(st.fixed_dictionaries({}, optional=FIELD_VALUES))
def test_flux_config_fields(fields):
    try:
        config = fluxc.FluxConfig(**fields)
    except Exception as exc:  # noqa: BLE001 -- the assertion below is the test
        _clear(exc, "FluxConfig.")
        assert any(name in str(exc) for name in fields), str(exc)
        return
    for name in ("sink", "window", "block", "n_last", "pool_size"):  # accepted: plain, sane values
        value = getattr(config, name)
        assert type(value) is int and value >= 0
    assert all(type(h) is int and h >= 1 for h in config.router_hidden)
    assert fluxc.FluxConfig.from_json(config.to_json()) == config


@FUZZ
@given(st.one_of(st.text(max_size=40), st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
                 st.dictionaries(st.sampled_from([*FIELD_VALUES, "version", "bogus"]), json_junk, max_size=4)
                 .map(json.dumps)))
def test_flux_config_from_json(text):
    try:
        fluxc.FluxConfig.from_json(text)
    except Exception as exc:  # noqa: BLE001
        _clear(exc, "FluxConfig")


# --- fluxc.compile arguments and routes
@functools.cache
def _model():
    return tiny_model("llama", "sdpa")


route_entry = st.one_of(st.sampled_from(["full", "sparse", True, False]), junk)


@FUZZ
@given(router_ckpt=st.one_of(st.none(), junk, st.just("/nonexistent/routers.safetensors"), st.just(os.sep)),
       config=st.one_of(st.none(), junk, st.dictionaries(st.sampled_from([*FIELD_VALUES, "bogus"]), junk, max_size=2)),
       route=st.one_of(st.none(), junk, st.sampled_from(["full", "sparse", "dense"]), st.lists(route_entry, max_size=4)))
def test_compile_arguments(router_ckpt, config, route):
    try:
        fm = fluxc.compile(_model(), router_ckpt, config=config, route=route)
    except Exception as exc:  # noqa: BLE001
        _clear(exc)
        assert any(word in str(exc) for word in ("router_ckpt", "config", "FluxConfig", "route", "checkpoint")), exc
        return
    assert isinstance(fm, fluxc.FluxModule)
    assert router_ckpt is None  # no file exists: only route-forced or default compiles succeed


@HEAVY
@given(st.lists(st.sampled_from(["full", "sparse"]), min_size=1, max_size=5))
def test_a_route_per_layer_must_match_the_layers(route):
    fm = fluxc.compile(_model(), config={"compiler": "eager", "sink": 2, "window": 4, "block": 2}, route=route)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    try:
        fm(input_ids=ids)
    except Exception as exc:  # noqa: BLE001
        _clear(exc, f"route has {len(route)} entries", "3 attention sites")
        assert len(route) != 3
        return
    assert len(route) == 3
    assert fluxc.last_route(fm)[0].tolist() == [r == "full" for r in route]


# every layout the fuzzer draws (batch 1 or 2, mask kinds) is a compile: more than Dynamo's default 8
MANY_LAYOUTS = torch._dynamo.config.patch(recompile_limit=64)


# --- model inputs: valid variations, and at most one fault the message must name
@functools.cache
def _compiled():
    return fluxc.compile(_model(), config={"compiler": "eager", "sink": 2, "window": 4, "block": 2}, route="sparse")


INPUT_FAULTS = {"ids-dtype": "input_ids", "ids-dims": "input_ids", "ids-values": "input_ids",
                "ids-device": "input_ids", "mask-zero-row": "attention_mask", "mask-short": "attention_mask",
                "mask-values": "attention_mask", "mask-device": "attention_mask", "mask-dtype": "attention_mask"}


@st.composite
def model_inputs(draw):
    fault = draw(st.sampled_from([None, None, None, *INPUT_FAULTS]))
    batch, length = draw(st.integers(1, 2)), draw(st.sampled_from([6, 9]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    ids = torch.randint(1, VOCAB, (batch, length), generator=g).to(draw(st.sampled_from([torch.long, torch.int32])))
    if fault == "ids-dtype":
        ids = draw(st.sampled_from([ids.float(), ids > 60, ids.to(torch.complex64)]))
    elif fault == "ids-dims":
        ids = draw(st.sampled_from([ids[0], ids[..., None], ids.new_empty(0)]))
    elif fault == "ids-values":
        ids[0, draw(st.integers(0, length - 1))] = draw(st.sampled_from([-1, -(2**30), VOCAB, VOCAB + 7, 2**30]))
    elif fault == "ids-device":
        ids = ids.to("meta")
    kind = draw(st.sampled_from(["none", "left", "right", "ones", "float", "bool", "4d"]))
    mask = None
    if kind != "none" or (fault or "").startswith("mask"):
        mask = torch.ones(batch, length, dtype=torch.long)
        pad = draw(st.integers(1, length - 1))
        if kind == "left":
            mask[-1, :pad] = 0
        elif kind == "right":
            mask[-1, length - pad:] = 0
        elif kind in ("float", "bool"):
            mask = mask.to(torch.float32 if kind == "float" else torch.bool)
        elif kind == "4d":
            mask = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
        if fault == "mask-zero-row":
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[draw(st.integers(0, batch - 1))] = 0
        elif fault == "mask-short":  # a (1, 5) mask for 9 tokens, or one key too many
            mask = torch.ones(draw(st.sampled_from([(batch, pad), (batch, length + 1), (batch + 1, length),
                                                    (batch, length, 2)])), dtype=torch.long)
        elif fault == "mask-values":
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[0, -1] = draw(st.sampled_from([2, -1, 7]))
        elif fault == "mask-device":
            mask = torch.ones(batch, length, dtype=torch.long, device="meta")
        elif fault == "mask-dtype":
            mask = torch.ones(batch, length, dtype=torch.complex64)
    return ids, mask, fault


@FUZZ
@given(model_inputs())
def test_model_inputs(case):
    ids, mask, fault = case
    try:
        with MANY_LAYOUTS:
            out = _compiled()(input_ids=ids, attention_mask=mask)
    except Exception as exc:  # noqa: BLE001
        event(f"rejected: {fault}")
        assert fault is not None, f"valid input rejected: {exc!r}"
        _clear(exc, INPUT_FAULTS[fault])
        return
    event("served")
    assert fault is None, f"{fault} accepted silently"
    assert out.logits.shape == (*ids.shape, VOCAB) and torch.isfinite(out.logits).all()


# --- fluxc.generate and the engine: valid calls, and at most one bad argument the message must name
def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


GENERATE_ARGS = {  # name: (valid values, is it valid)
    "max_new_tokens": (st.integers(0, 4), lambda v: type(v) is int and v >= 0),
    "do_sample": (st.booleans(), lambda v: type(v) is bool),
    "temperature": (st.floats(0.1, 3.0), lambda v: _number(v) and v > 0),
    "top_k": (st.integers(0, 50), lambda v: type(v) is int and v >= 0),
    "top_p": (st.floats(0.05, 1.0), lambda v: _number(v) and 0 < v <= 1),
    "eos_token_id": (st.one_of(st.none(), st.integers(0, VOCAB - 1)),
                     lambda v: v is None or (type(v) is int and 0 <= v < VOCAB)),
    "engine": (st.sampled_from([None, True, False]), lambda v: v is None or type(v) is bool),
    "cuda_graphs": (st.sampled_from(["auto", False]), lambda v: (type(v) is str and v == "auto") or v is False),
    "errors": (st.sampled_from(["raise", "return"]), lambda v: type(v) is str and v in ("raise", "return")),
}
BAD_PROMPTS = [torch.zeros(0, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), torch.tensor([1.5, 2.0]),
               torch.tensor([3, VOCAB + 1]), torch.tensor([-1, 4]), "text", None, 3]


@st.composite
def generate_calls(draw):
    bad = draw(st.sampled_from([None, None, None, "prompts", *GENERATE_ARGS]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    layout = draw(st.sampled_from(["list", "tensor"]))
    if layout == "tensor":
        prompts = torch.randint(1, VOCAB, (2, draw(st.integers(1, 10))), generator=g)
    else:
        prompts = [torch.randint(1, VOCAB, (draw(st.integers(1, 12)),), generator=g)
                   for _ in range(draw(st.integers(0, 3)))]
    if bad == "prompts":
        prompts = [*([] if isinstance(prompts, torch.Tensor) else prompts), draw(st.sampled_from(BAD_PROMPTS))]
    args = {name: draw(junk if name == bad else valid) for name, (valid, _) in GENERATE_ARGS.items()}
    return prompts, args, bad


@HEAVY
@given(generate_calls())
def test_generate_arguments(call):
    prompts, args, bad = call
    bad_value = bad is not None and bad != "prompts" and not GENERATE_ARGS[bad][1](args[bad])
    new = args.pop("max_new_tokens")
    combination = args["errors"] == "return" and (isinstance(prompts, torch.Tensor) or args["engine"] is False)
    try:
        with MANY_LAYOUTS:
            out = fluxc.generate(_compiled(), prompts, new, **args)
    except Exception as exc:  # noqa: BLE001
        event(f"rejected: {bad}")
        _clear(exc)
        if bad_value:
            assert bad in str(exc), exc
        elif combination:
            assert "errors=" in str(exc), exc
        elif bad == "prompts":
            assert "prompt" in str(exc) and args["errors"] == "raise", exc
        else:
            assert combination and "errors=" in str(exc), f"valid call rejected: {exc!r}"
        return
    event("served")
    assert not bad_value, f"{bad}={args[bad]!r} accepted silently"
    assert not combination
    if isinstance(prompts, torch.Tensor):
        assert out.shape[0] == prompts.shape[0] and prompts.shape[1] <= out.shape[1] <= prompts.shape[1] + new
        assert torch.equal(out[:, :prompts.shape[1]], prompts)
        return
    assert isinstance(out, list) and len(out) == len(prompts)
    for prompt, answer in zip(prompts, out):
        if isinstance(answer, fluxc.RequestError):  # errors="return": the invalid prompt's own error
            assert bad == "prompts" and args["errors"] == "return" and not _valid_prompt(prompt)
            continue
        assert _valid_prompt(prompt) and torch.equal(answer[:prompt.numel()], prompt)
        assert prompt.numel() <= answer.numel() <= prompt.numel() + new


def _valid_prompt(prompt) -> bool:
    return (isinstance(prompt, torch.Tensor) and prompt.dim() == 1 and prompt.numel() > 0
            and prompt.dtype in (torch.long, torch.int32) and 0 <= int(prompt.min()) and int(prompt.max()) < VOCAB)


# --- router files
@functools.cache
def _router_tensors():
    routers = torch.nn.ModuleList(fluxc.ops.LayerRouter(16, (8, 4, 8, 4)) for _ in range(3))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.safetensors")
        config = fluxc.FluxConfig(sink=2, window=4, block=2, router_hidden=(8, 4, 8, 4), pool_size=4, compiler="eager")
        fluxc.save_routers(path, routers, config, model_fingerprint(_model()), {"test": "fuzz"})
        with open(path, "rb") as fh:
            raw = fh.read()
        return routers, config, raw, load_file(path)


def _metadata(raw: bytes) -> dict:
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length])["__metadata__"]


MUTATIONS = ["none", "truncate", "flip", "garbage", "drop", "extra", "dtype", "shape", "nonfinite", "layers",
             "fingerprint", "config", "format"]


@FUZZ
@given(mutation=st.sampled_from(MUTATIONS), seed=st.integers(0, 10**6), layout=st.sampled_from(["fluxc", "released"]))
def test_router_files(mutation, seed, layout, tmp_path_factory):
    assume(layout == "fluxc" or mutation not in ("fingerprint", "format"))
    g = torch.Generator().manual_seed(seed)
    routers, config, raw, tensors = _router_tensors()
    folder = tmp_path_factory.mktemp("ckpt")
    path = str(folder / "r.safetensors")
    if layout == "released":
        _released_folder(folder, routers, _model())
        path = str(folder)
        shard = str(folder / "model-00001-of-00002.safetensors")
        tensors = load_file(shard)
        keys = [k for k in sorted(tensors) if "mask_allocator" in k]
        target = shard
    else:
        tensors = dict(tensors)  # the cached originals stay whole
        keys = sorted(tensors)
        target = path
    metadata = _metadata(raw) if layout == "fluxc" else None
    key = keys[int(torch.randint(len(keys), (1,), generator=g))] if keys else None
    if mutation in ("truncate", "flip", "garbage"):
        data = raw if layout == "fluxc" else open(target, "rb").read()
        if mutation == "truncate":
            data = data[:int(torch.randint(len(data), (1,), generator=g))]
        elif mutation == "flip":  # in the header: safetensors has no checksum, flipped weights read as weights
            header_end = 8 + struct.unpack("<Q", data[:8])[0]
            data = bytearray(data)
            for i in torch.randint(header_end, (4,), generator=g).tolist():
                data[i] ^= 0xFF
            data = bytes(data)
        else:
            data = torch.randint(256, (int(torch.randint(1, 300, (1,), generator=g)),), generator=g,
                                 dtype=torch.uint8).numpy().tobytes()
        with open(target, "wb") as fh:
            fh.write(data)
    else:
        if mutation == "drop" and key is not None:
            tensors.pop(key)
        elif mutation == "extra":
            tensors["layers.0.extra.weight" if layout == "fluxc" else
                    "model.layers.0.self_attn.mask_allocator.cls_feat_extractor.9.weight"] = torch.ones(2)
        elif mutation == "dtype" and key is not None:
            tensors[key] = tensors[key].to(torch.int32 if seed % 2 else torch.float16)
        elif mutation == "shape" and key is not None:
            tensors[key] = torch.zeros(*(s + 1 for s in tensors[key].shape))
        elif mutation == "nonfinite" and key is not None:
            tensors[key] = tensors[key].clone().flatten().index_fill(0, torch.tensor([0]), float("nan")).view(
                tensors[key].shape)
        elif mutation == "layers":
            tensors = {k.replace("layers.2.", "layers.5."): v for k, v in tensors.items()}
        elif mutation == "fingerprint":
            info = json.loads(metadata["fluxc"])
            info["fingerprint"] = {**info["fingerprint"], ["num_layers", "q_heads", "kv_heads", "head_dim"][seed % 4]:
                                   [7, "x", None, -1][seed // 4 % 4]}
            metadata = {"fluxc": json.dumps(info)}
        elif mutation == "config":
            if layout == "fluxc":
                info = json.loads(metadata["fluxc"])
                info["config"] = {**info["config"], "sink": ["x", -4, None, 2.5][seed % 4]}
                metadata = {"fluxc": json.dumps(info)}
            else:
                cfg = json.loads((folder / "config.json").read_text())
                cfg[["sink_size", "num_hidden_layers", "hidden_size", "toggle_type"][seed % 4]] = \
                    ["x", None, -1, [1]][seed // 4 % 4]
                (folder / "config.json").write_text(json.dumps(cfg))
        elif mutation == "format":
            metadata = {"fluxc": ["{", "[]", json.dumps({"format": "other"})][seed % 3]}
        save_file(tensors, target, metadata=metadata)
    model = _model()
    try:
        fm = fluxc.compile(model, path, config=config if layout == "fluxc" else None)
        routers_read = fluxc.read_checkpoint(path).load_routers()
    except Exception as exc:  # noqa: BLE001
        _clear(exc, os.path.basename(path))
        assert mutation != "none", f"a valid file was rejected: {exc}"
        return
    # accepted: the file is whole, finite and fits the model (a lossless dtype change is a valid file)
    assert mutation in ("none", "dtype", "extra") or (mutation == "config" and layout == "released"), mutation
    assert len(routers_read) == 3 and all(torch.isfinite(p).all() for p in routers_read.parameters())
    ids = torch.randint(1, VOCAB, (1, 9), generator=g)
    assert torch.isfinite(fm(input_ids=ids).logits).all()


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 0.0, "0.5", None])
def test_sampling_values_are_checked(value):
    with pytest.raises(fluxc.ConfigError, match=r"temperature|top_p"):
        fluxc.SamplingConfig(True, temperature=value)
    with pytest.raises(fluxc.ConfigError, match="top_p"):
        fluxc.SamplingConfig(True, top_p=value)


def test_the_recompile_limit_is_a_clear_error():
    fm = fluxc.compile(_model(), config={"compiler": "eager", "sink": 2, "window": 4, "block": 2}, route="full")
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch._dynamo.config.patch(recompile_limit=1):
        fm(input_ids=ids)
        with pytest.raises(fluxc.RecompileLimitError, match=r"recompile_limit=1.*fluxc.generate"):
            fm(input_ids=ids, attention_mask=torch.ones(2, 1, 7, 7, dtype=torch.bool).tril())
    ints = fm(input_ids=ids.int(), attention_mask=torch.ones(2, 7, dtype=torch.bool)).logits
    assert torch.equal(ints, fm(input_ids=ids, attention_mask=torch.ones(2, 7, dtype=torch.long)).logits)
