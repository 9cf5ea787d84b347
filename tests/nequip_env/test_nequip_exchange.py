"""Per-layer ghost exchange for NequIP (pair_style ltau message_passing exchange, its default).

With one cutoff of ghost atoms and pairs centred on local atoms, the adapter sends the node
features after each convolution but the last through ``exchange=``: it must give the same
numbers as the thick ghost shell and as one rank (folded graph): forces, energy, virial,
per-atom energy and virial, and fix ltau's per-atom values, by atom ID, on 2 and 3 ranks (3
ranks on a 10.9 A box make subdomains thinner than the ghost cutoff: ghosts of ghosts are
relayed), through re-neighbouring; also with a rank that owns no atom. In-process, an exchange
that copies owners' rows onto explicit periodic images checks the adapter alone.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from ase.build import bulk

pytest.importorskip("nequip")
pytest.importorskip("allegro")     # helpers.nequip_models builds Allegro models too
from helpers.adapter_checks import explicit_images, inputs, si_c_cell  # noqa: E402
from helpers.exchange_checks import write_cell_and_slab  # noqa: E402
from helpers.exchange_checks import (test_exchange_equals_shell_and_one_rank,  # noqa: E402,F401 (collected here)
                                     test_rank_without_atoms_takes_part_in_the_exchanges)
from helpers.nequip_models import tiny  # noqa: E402

from ltau_lmp.model import NequIPForceField, evaluate  # noqa: E402

def _owner_exchange(owners, n_local, calls):
    """The contract's exchange on one process: ghost rows := their owners' rows (differentiable:
    the backward sums ghost gradients onto the owners), recording each call's width."""
    index = torch.from_numpy(owners)

    def exchange(rows):
        calls.append(rows.shape[1])
        return rows[:n_local].index_select(0, index)
    return exchange


def test_exchange_with_one_cutoff_of_ghosts_is_exact():
    adapter = NequIPForceField(tiny("nequip"))
    assert adapter.card.ghost_exchange and adapter.exchange_widths == (32,)
    atoms = si_c_cell(seed=6)
    periodic = evaluate(adapter, *inputs(adapter, atoms))
    cluster, owners = explicit_images(atoms, adapter.card.cutoff + 0.5)
    positions, species, c, n, _, _ = inputs(adapter, cluster)
    keep = c < len(atoms)                                  # pairs centred on local atoms only
    c, n = c[keep], n[keep]
    positions.requires_grad_()
    calls = []
    energy, latent = adapter(positions, species, c, n, None, len(atoms),
                             exchange=_owner_exchange(owners, len(atoms), calls))
    (grad,) = torch.autograd.grad(energy.sum(), positions)
    forces = np.zeros((len(atoms), 3))
    np.add.at(forces, owners, -grad.numpy())
    assert calls == [32]
    assert np.abs(forces - periodic.forces.numpy()).max() <= 1e-10
    np.testing.assert_allclose(energy.detach().numpy(), periodic.atom_energy.detach().numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(latent.detach().numpy(), periodic.latent.numpy(), rtol=0, atol=1e-10)
    # the same graph without the exchange is wrong: the ghosts' node features had no messages
    wrong, _ = adapter(positions, species, c, n, None, len(atoms))
    assert (wrong - energy).abs().max() > 1e-7


def test_ranks_without_atoms_or_pairs_make_the_same_exchanges():
    adapter = NequIPForceField(tiny("nequip"))
    positions, species, c, n, s, n_local = inputs(adapter, si_c_cell(seed=9))
    owners = np.arange(n_local)
    for local, pairs in ((0, slice(None)), (n_local, slice(0))):
        calls = []
        offset = torch.zeros_like(s[pairs], requires_grad=True)
        energy, latent = adapter(positions, species, c[pairs], n[pairs], s[pairs] + offset, local,
                                 exchange=_owner_exchange(owners, n_local, calls))
        assert energy.shape == (local,) and latent.shape == (local, adapter.latent_dim)
        torch.autograd.grad(energy.sum(), offset, allow_unused=True)   # the backward runs
        assert calls == list(adapter.exchange_widths)


def test_allegro_declares_no_exchange():
    assert not NequIPForceField(tiny("allegro")).card.ghost_exchange


@pytest.fixture(scope="module")
def files(nequip_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("nequip_exchange")
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 2, 2))  # 64 atoms, 10.9 A box
    atoms.positions += np.random.default_rng(1).normal(0.0, 0.08, atoms.positions.shape)
    atoms.wrap()
    return {"model": str(nequip_run / "ltau" / "model.ckpt"), "est": str(nequip_run / "ltau" / "estimator"),
            "elements": "Si", "masses": "mass 1 28.0855", "pair_options": "", "fix_options": "",
            **write_cell_and_slab(root, atoms, ["Si"])}
