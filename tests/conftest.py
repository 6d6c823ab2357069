import os

import pytest
import torch

# Tests run on CPU in float32; determinism for numerics comparisons.
torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
