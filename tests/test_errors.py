"""Bad input gets a FluxError subclass naming the problem; attention-like graphs that are not attention
are left alone."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fluxc
from fluxc.passes import counters

from hf_models import batch, tiny_model

EAGER = fluxc.FluxConfig(sink=2, window=4, block=2, compiler="eager")


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class AttentionLike(nn.Module):
    """softmax(x @ W) @ V: a gate/classifier, and q @ k^T softmax without a value matmul: not attention."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(8, 4))
        self.values = nn.Parameter(torch.randn(4, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # x (B, T, 8)
        mix = torch.softmax(torch.matmul(x, self.gate), dim=-1) @ self.values  # MoE-style gate
        q = self.proj(x).view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)
        sim = torch.softmax(torch.matmul(q, q.transpose(-2, -1)) * 0.5, dim=-1)  # similarities, no @ v
        return mix + sim.sum()


def _ckpt(tmp_path, layers=3, head_dim=16, arch="LlamaForCausalLM", heads=4, kv=2, cfg=None):
    cfg = cfg or EAGER.replace(router_hidden=(8, 8, 8, 8))
    routers = nn.ModuleList(fluxc.ops.LayerRouter(head_dim, cfg.router_hidden) for _ in range(layers))
    path = tmp_path / "r.safetensors"
    fluxc.save_routers(path, routers, cfg, fluxc.Fingerprint(arch, layers, heads, kv, head_dim))
    return path


def test_model_without_attention_raises():
    fm = fluxc.compile(NoAttention(), route="full", config=EAGER)
    with pytest.raises(fluxc.NoAttentionError, match="no attention site"):
        fm(torch.randn(2, 8))


def test_attention_like_graphs_do_not_match():
    counters.clear()
    fm = fluxc.compile(AttentionLike(), route="full", config=EAGER)
    with pytest.raises(fluxc.NoAttentionError):
        fm(torch.randn(2, 5, 8))
    assert counters["sites_found"] == 0 and counters["sites_rewritten"] == 0


def test_bidirectional_attention_is_kept_and_routing_it_is_an_error():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
            return F.scaled_dot_product_attention(q, k, v).sum(1)

    model = Encoder()
    x = torch.randn(1, 6, 16)
    fm = fluxc.compile(model, route="full", config=EAGER)
    torch.testing.assert_close(fm(x), model(x))
    (site,) = fluxc.sites(fm)
    assert not site.routable and "bidirectional" in site.reason
    with pytest.raises(fluxc.RouteError, match="kept as-is"):
        fluxc.compile(model, route="sparse", config=EAGER)(x)


def test_checkpoint_for_another_model_fails_before_loading(tmp_path):
    model = tiny_model("llama", "sdpa")
    path = _ckpt(tmp_path, layers=5)
    with pytest.raises(fluxc.CheckpointMismatchError, match=r"num_layers: checkpoint 5 vs model 3"):
        fluxc.compile(model, str(path))
    path = _ckpt(tmp_path, layers=3, arch="Qwen3ForCausalLM")
    with pytest.raises(fluxc.CheckpointMismatchError, match="architecture: checkpoint 'Qwen3ForCausalLM' vs model 'LlamaForCausalLM'"):
        fluxc.compile(model, str(path))


def test_plain_model_checkpoint_mismatch_is_caught_at_trace(tmp_path):
    from plain_decoders import PlainDecoder

    model = PlainDecoder("fast").eval()
    path = _ckpt(tmp_path, layers=2, arch="PlainDecoder")
    fm = fluxc.compile(model, str(path), config=EAGER.replace(router_hidden=(8, 8, 8, 8)))
    with pytest.raises(fluxc.CheckpointMismatchError, match="num_layers: checkpoint 2 vs model 3"):
        fm(torch.randint(0, 97, (1, 6)))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_json", "missing_tensor"])
def test_corrupt_checkpoint(tmp_path, damage):
    path = _ckpt(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        path.write_bytes(b"\x01\x02")
    elif damage == "bad_json":
        (length,) = struct.unpack("<Q", data[:8])
        path.write_bytes(data[:8] + b"{" * length + data[8 + length:])
    else:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        header.pop("layers.1.head.2.bias")
        text = json.dumps(header).encode()
        text += b" " * (length - len(text))
        path.write_bytes(data[:8] + text + data[8 + length:])
    with pytest.raises(fluxc.CorruptCheckpointError):
        fluxc.compile(tiny_model("llama", "sdpa"), str(path))


def test_unknown_options_and_values():
    model = tiny_model("llama", "sdpa")
    with pytest.raises(fluxc.ConfigError, match="unknown FluxConfig field"):
        fluxc.FluxConfig.from_dict({"sink": 4, "windw": 8})
    with pytest.raises(fluxc.ConfigError, match="pattern"):
        fluxc.FluxConfig(pattern="diagonal")
    with pytest.raises(fluxc.ConfigError, match="multiples of block"):
        fluxc.FluxConfig(sink=3, window=8, block=4)
    with pytest.raises(fluxc.RouteError, match="route='dense'"):
        fluxc.compile(model, route="dense")
    with pytest.raises(fluxc.RouteError, match=r"route\[1\]"):
        fluxc.compile(model, route=["full", "half"])
    with pytest.raises(fluxc.ConfigError, match="no router checkpoint"):
        fluxc.compile(model)
    ids, mask = batch()
    with pytest.raises(fluxc.RouteError, match="route has 2 entries but the model has 3"):
        fluxc.compile(model, route=["full", "sparse"], config=EAGER)(input_ids=ids, attention_mask=mask)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:  # Dynamo wraps backend errors
        torch.compile(model, backend="flux", options={"rout": "full"})(input_ids=ids)
    assert isinstance(info.value.inner_exception, fluxc.ConfigError)
    assert "unknown flux backend option(s) ['rout']" in str(info.value.inner_exception)
    with pytest.raises(fluxc.ImplementationError, match="needs CUDA"):
        fluxc.compile(model, route="full", config=EAGER.replace(impl="triton"))(input_ids=ids)
    torch._dynamo.reset()


def test_config_round_trip_and_checkpoint_config_conflict(tmp_path):
    cfg = fluxc.FluxConfig(pattern="triangle", sink=4, window=8, block=4, n_last=3)
    assert fluxc.FluxConfig.from_json(cfg.to_json()) == cfg
    path = _ckpt(tmp_path)
    with pytest.raises(fluxc.ConfigError, match="differs from the router checkpoint"):
        fluxc.compile(tiny_model("llama", "sdpa"), str(path), config=EAGER.replace(window=8))
    assert math.isclose(fluxc.read_checkpoint(path).config.window, EAGER.window)
