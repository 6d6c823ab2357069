"""`SiteSpec`: one object for a site's static facts, crossing the custom-op boundary as text."""

from __future__ import annotations

import pytest
import torch

import fluxc
from fluxc.spec import SiteSpec


def test_text_round_trip_and_canonical_form():
    spec = SiteSpec(is_causal=True, scale=0.125, softcap=30.0, math="eager", softmax_fp32=False, bottom_right=True,
                    native_window=7, pattern="triangle", sink=4, window=8, block=4, block_exact=True, n_last=3,
                    impl="reference")
    text = spec.encode()
    assert SiteSpec.decode(text) == spec
    assert text == SiteSpec.decode(text).encode()  # canonical: sorted fields, literal values
    assert text.startswith("block=4;block_exact=True;bottom_right=True;")


def test_config_supplies_the_sparse_branch():
    config = fluxc.FluxConfig(pattern="triangle", sink=2, window=4, block=2, n_last=5, impl="reference")
    spec = SiteSpec.for_config(config, scale=0.5, math="eager")
    assert (spec.pattern, spec.sink, spec.window, spec.block, spec.n_last, spec.impl) == ("triangle", 2, 4, 2, 5,
                                                                                          "reference")
    assert spec.rule == dict(sink=2, window=4, block=2, block_exact=True)


@pytest.mark.parametrize("text, match", [
    ("not a spec", "not a SiteSpec encoding"),
    ("sink=4;colour='red'", r"fields \['colour'\]"),
    ("sink=3;window=8;block=4;block_exact=True", "multiples of block"),
    ("math='fast'", "math='fast' is unknown"),
])
def test_bad_text_names_the_fix(text, match):
    with pytest.raises(fluxc.ConfigError, match=match):
        SiteSpec.decode(text)


def test_a_spec_built_under_dynamo_is_a_constant():
    """The decode engine's cache builds its spec inside traced code (exported decode steps)."""
    config = fluxc.FluxConfig(sink=2, window=4, block=2)

    def step(x):
        return x + len(SiteSpec.for_config(config).encode())

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert compiled(torch.zeros(2)).tolist() == [float(len(SiteSpec.for_config(config).encode()))] * 2
