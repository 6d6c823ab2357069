"""`import fluxc` has no side effects: no CUDA init, no Triton, no global state changes."""

import subprocess
import sys

# Checked in a fresh interpreter that imports only torch first (torch._dynamo itself imports Triton).
LEAN = r"""
import logging, os, sys
import torch
env_before = dict(os.environ)
handlers_before, level_before = list(logging.getLogger().handlers), logging.getLogger().level
dtype_before, grad_before = torch.get_default_dtype(), torch.is_grad_enabled()
import fluxc
assert "triton" not in sys.modules, "fluxc imported triton"
assert "torch._inductor" not in sys.modules, "fluxc imported inductor"
assert not torch.cuda.is_initialized(), "fluxc initialised CUDA"
assert dict(os.environ) == env_before, "fluxc changed the environment"
assert logging.getLogger().handlers == handlers_before and logging.getLogger().level == level_before
assert logging.getLogger("fluxc").handlers == [] and logging.getLogger("fluxc").level == logging.NOTSET
assert torch.get_default_dtype() == dtype_before and torch.is_grad_enabled() == grad_before
assert hasattr(torch.ops.fluxc, "routed_attention") and hasattr(torch.ops.fluxc, "router_logits")
print("clean")
"""

# Compiler configuration is untouched by the import (checked with the configs loaded first).
CONFIGS = r"""
import torch, torch._dynamo.config as dc, torch._inductor.config as ic
dyn_before, ind_before = dc.get_config_copy(), ic.get_config_copy()
import fluxc
assert dc.get_config_copy() == dyn_before and ic.get_config_copy() == ind_before
print("clean")
"""


def _run(code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"


def test_import_is_lean():
    _run(LEAN)


def test_import_leaves_compiler_config_alone():
    _run(CONFIGS)


# torch.compile(backend="flux") finds the backend through the torch_dynamo_backends entry point.
ENTRY_POINT = r"""
import sys
import torch
import torch.nn.functional as F

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, 8, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

torch.manual_seed(0)
model, x = Tiny(), torch.randn(1, 8, 32)
assert "fluxc" not in sys.modules
with torch.no_grad():
    out = torch.compile(model, backend="flux", options={"route": "full", "compiler": "eager"})(x)
assert "fluxc" in sys.modules  # loaded by Dynamo through the entry point
assert torch.allclose(out, model(x), atol=1e-6)
print("clean")
"""


def test_flux_backend_is_found_without_importing_fluxc():
    _run(ENTRY_POINT)


def test_no_checkout_folder_shadows_an_installed_package():
    """Only `fluxc` is importable from the repository root: `passes`, `kernels`, `training` are its
    subpackages, so a hub package such as `kernels` (which transformers imports) resolves to the real one."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    packages = sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["fluxc"]
    for name in ("passes", "kernels", "training"):
        code = (f"import importlib.util, sys; sys.path.insert(0, {str(root)!r}); "
                f"spec = importlib.util.find_spec({name!r}); "
                f"print('clean' if spec is None or not spec.origin.startswith({str(root / name)!r}) else spec.origin)")
        _run(code)
