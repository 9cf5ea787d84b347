"""The tiny built-in model and its training config, shared by the trainer tests."""

from ltau_lmp.training.config import config_from_dict

SMALL_MODEL = {"n_basis": 4, "n_radial": 4, "max_l": 2, "hidden": [16], "latent_dim": 8}


def small_config(sets: dict, out_dir, **overrides):
    """A few epochs of SMALL_MODEL on ``sets["train"]`` (scored on ``sets["test"]`` when given);
    ``data=`` in ``overrides`` updates the data section, other keys replace the options."""
    options = {"out_dir": str(out_dir), "epochs": 4, "batch_size": 3, "lr": 5e-3, "threads": 1,
               "schedule": "none", "early_stopping": 0, "model": SMALL_MODEL,
               "data": {"train": str(sets["train"]), "val_fraction": 0.25,
                        "test": {"test": str(sets["test"])} if "test" in sets else {}}}
    options["data"].update(overrides.pop("data", {}))
    options.update(overrides)
    return config_from_dict(options)
