"""No pickle from a user path runs: router files (fluxc's and the released layout), a training run's resume
state and `fluxc export --model` folders are read as safetensors / JSON only. A pickle that writes a marker
file when unpickled is planted in each; every load ends in a FluxError and the marker never appears."""

from __future__ import annotations

import json
import pathlib
import pickle

import pytest
import torch
from test_training import _train

import fluxc
from fluxc.training import RouterTrainer, TrainConfig
from fluxc.training.state_io import load_state

from hf_models import tiny_model


class Payload:
    """Unpickling it writes `marker`: the proof that a pickle ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "a planted pickle ran")


def _plant(path: pathlib.Path, marker: pathlib.Path, how: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "torch.save":  # the zip container torch.load reads (weights_only=False would run it)
        torch.save({"routers": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    return path


@pytest.fixture
def marker(tmp_path):
    marker = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload works: loading it does write the marker
    assert marker.exists()
    marker.unlink()
    yield marker
    assert not marker.exists(), "a planted pickle was unpickled"


@pytest.mark.parametrize("name", ["routers.pt", "routers.safetensors", "routers.bin"])
@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_router_files_are_never_unpickled(tmp_path, marker, name, how):
    path = _plant(tmp_path / name, marker, how)
    with pytest.raises(fluxc.CheckpointError, match=name):
        fluxc.compile(tiny_model("llama", "sdpa"), str(path))


def test_a_released_folder_with_a_pickled_model_is_refused(tmp_path, marker):
    folder = tmp_path / "released"
    _plant(folder / "pytorch_model.bin", marker, "torch.save")
    (folder / "config.json").write_text(json.dumps({"toggle_type": "streaming", "num_hidden_layers": 3}))
    with pytest.raises(fluxc.CheckpointError, match="no .safetensors file"):
        fluxc.compile(tiny_model("llama", "sdpa"), str(folder))


def test_a_resume_state_is_never_unpickled(tmp_path, marker):
    model = tiny_model("llama", "sdpa", layers=2)
    path = tmp_path / "routers.safetensors"
    _train(model, 1).save(str(path), {"data": "test"})
    state = pathlib.Path(f"{path}.state.safetensors")
    assert load_state(state)["step"] == 1  # the real state loads
    state.rename(tmp_path / "real.state")
    config = TrainConfig(steps=4, targets={"holistic": 1.0, "retrieval": 0.0})
    _plant(pathlib.Path(f"{path}.state.pt"), marker, "torch.save")  # what an older fluxc wrote: refused
    with pytest.raises(fluxc.CheckpointError, match=r"\.state\.pt is a pickled training state"):
        RouterTrainer.resume(str(path), model, config)
    for how in ("torch.save", "pickle"):  # a pickle under the new name: not a safetensors file
        _plant(state, marker, how)
        with pytest.raises(fluxc.CorruptCheckpointError, match="not a readable training state"):
            RouterTrainer.resume(str(path), model, config)


def test_export_reads_only_safetensors_weights(tmp_path, marker, capsys):
    import fluxc.cli

    folder = tmp_path / "model"
    tiny = tiny_model("llama", "sdpa")
    folder.mkdir()
    tiny.config.save_pretrained(folder)
    _plant(folder / "pytorch_model.bin", marker, "torch.save")
    code = fluxc.cli.main(["export", "--model", str(folder), "--route", "full", "--out", str(tmp_path / "out")])
    assert code == 2 and "safetensors" in capsys.readouterr().err
