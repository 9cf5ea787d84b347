"""ModelCard: the built-in model declares its contract; validation; family detection and loading."""

import dataclasses
import json

import pytest
import torch

from ltau_lmp.errors import ConfigError, FileFormatError
from ltau_lmp.model import LocalForceField, ModelCard, detect_family, load_model, save_model

HASH = "0" * 64


def card(**overrides):
    fields = {"family": "ltau_local", "species": ("Si", "C"), "cutoff": 4.0, "num_layers": 1,
              "receptive_field": 4.0, "latent_dim": 8, "latent": "test", "dtype": "float64",
              "model_hash": HASH}
    return ModelCard(**{**fields, **overrides})


def test_local_model_card():
    model = LocalForceField(["Si", "C"], cutoff=3.5, latent_dim=12, hidden=[8], seed=0)
    c = model.card
    assert (c.family, c.species, c.cutoff, c.num_layers, c.receptive_field) == \
        ("ltau_local", ("Si", "C"), 3.5, 1, 3.5)
    assert (c.latent_dim, c.dtype, c.energy_unit, c.length_unit) == (12, "float64", "eV", "Angstrom")
    assert c.model_hash == model.model_hash and "MLP" in c.latent
    assert json.loads(json.dumps(c.to_dict()))["species"] == ["Si", "C"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.cutoff = 5.0
    assert LocalForceField(["Si"], dtype="float32", seed=0).card.dtype == "float32"


def test_card_hash_follows_the_weights():
    model = LocalForceField(["Si"], hidden=[8], latent_dim=4, seed=0)
    before = model.card.model_hash
    assert LocalForceField(["Si"], hidden=[8], latent_dim=4, seed=0).card.model_hash == before
    with torch.no_grad():
        model.readout.bias += 1e-12
    assert model.card.model_hash != before


def test_card_is_built_once_and_follows_loaded_weights():
    """The card is cached (reading it is cheap) but always describes the current weights: loaded
    (as replay loads each epoch's checkpoint), moved, or changed in a copy."""
    import copy

    model = LocalForceField(["Si"], hidden=[8], latent_dim=4, seed=0)
    other = LocalForceField(["Si"], hidden=[8], latent_dim=4, seed=1)
    first = model.card
    assert model.card is first and model.model_hash == first.model_hash
    clone = copy.deepcopy(model)
    assert clone.card == first
    with torch.no_grad():
        clone.readout.weight.mul_(2.0)
    assert clone.card.model_hash != first.model_hash and model.card is first
    model.load_checkpoint({"model": other.state_dict()})   # MACE's layout
    assert model.card.model_hash == other.card.model_hash
    model.load_checkpoint(clone.state_dict())              # a plain state dict
    assert model.card.model_hash == clone.card.model_hash
    assert model.to(torch.float32).card.dtype == "float32"


def test_card_species_tuple_and_equality():
    assert card(species=["Si", "C"]) == card()


@pytest.mark.parametrize("overrides, message", [
    ({"species": ()}, "species"),
    ({"species": ("Si", "Si")}, "species"),
    ({"species": ("Xx",)}, "unknown chemical symbol"),
    ({"cutoff": 0.0}, "cutoff"),
    ({"num_layers": 0, "receptive_field": 0.0}, "num_layers"),
    ({"num_layers": 2}, "receptive_field"),
    ({"latent_dim": 0}, "latent_dim"),
    ({"dtype": "float16"}, "dtype"),
    ({"model_hash": "abc"}, "sha256"),
    ({"family": ""}, "family"),
])
def test_card_validation(overrides, message):
    with pytest.raises(ConfigError, match=message):
        card(**overrides)


def test_saved_local_model_keeps_its_card(tmp_path):
    model = LocalForceField(["Si"], hidden=[8], latent_dim=4, seed=1)
    path = tmp_path / "model.pt"
    save_model(model, path)
    assert detect_family(path) == "ltau_local"
    assert load_model(path).card == model.card
    assert load_model(path, family="ltau_local").card == model.card


def test_load_model_errors(tmp_path):
    with pytest.raises(FileFormatError, match="no such file"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(FileFormatError, match="no such file"):
        load_model(tmp_path / "missing.pt", family="mace")
    text = tmp_path / "frames.xyz"
    text.write_text("2\n\nSi 0 0 0\nSi 1 1 1\n")
    with pytest.raises(FileFormatError, match="not a torch model file"):
        load_model(text)
    model = LocalForceField(["Si"], hidden=[8], latent_dim=4, seed=1)
    save_model(model, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match="unknown model family 'schnet'"):
        load_model(tmp_path / "model.pt", family="schnet")
    checkpoint = tmp_path / "epoch-3.pt"
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_scheduler": {}}, checkpoint)
    with pytest.raises(FileFormatError, match="training checkpoint"):
        load_model(checkpoint)
    scripted = tmp_path / "compiled.model"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 1)), scripted)
    with pytest.raises(FileFormatError, match="TorchScript"):
        load_model(scripted)
