"""Per-layer ghost exchange for message-passing models (pair_style ltau message_passing exchange).

With one cutoff of ghost atoms and pairs centred on local atoms, the runtime refreshes the ghost
rows of MACE's node features from their owners after each layer (LAMMPS forward communication)
and sums their gradients back (reverse communication). It must give the same numbers as the
thick ghost shell and as one rank (folded graph): forces, energy, virial, per-atom energy and
virial, and fix ltau's per-atom values, by atom ID, on 2 and 3 ranks (3 ranks on a 10.9 A box
make subdomains thinner than the ghost cutoff, so ghosts of ghosts are relayed), through
re-neighbouring and atoms migrating between ranks. A failure on one rank, between two
exchanges or in the backward, stops every rank with its message (the other ranks learn of it
in their next exchange and step aside, so that rank's message is the one shown).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("mace")
from helpers.mpi_run import mpirun  # noqa: E402
from helpers.adapter_checks import si_c_cell  # noqa: E402
from helpers.exchange_checks import SCRIPT, write_cell_and_slab  # noqa: E402
from helpers.exchange_checks import (test_exchange_equals_shell_and_one_rank,  # noqa: E402,F401 (collected here)
                                     test_rank_without_atoms_takes_part_in_the_exchanges)
from helpers.mace_models import tiny_mace  # noqa: E402

from ltau_lmp.errors import LTAUError  # noqa: E402
from ltau_lmp.estimator import ErrorLog, LTAUEstimator  # noqa: E402
from ltau_lmp.lammps import abi  # noqa: E402
from ltau_lmp.lammps.pair import PairOptions, message_passing_mode  # noqa: E402
from ltau_lmp.model import MACEForceField, ModelCard, evaluate, neighbor_list, species_indices  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("exchange")
    model = tiny_mace(seed=3)
    torch.save(model, root / "tiny.model")
    atoms = si_c_cell((2, 2, 2), rattle=0.08, seed=11)
    cells = write_cell_and_slab(root, atoms, ["C", "Si"])
    adapter = MACEForceField(model)
    c, n, s = neighbor_list(atoms, adapter.card.cutoff)
    latent = evaluate(adapter, torch.tensor(atoms.positions), torch.from_numpy(species_indices(atoms, ["C", "Si"])),
                      torch.from_numpy(c), torch.from_numpy(n), torch.from_numpy(s), len(atoms),
                      forces=False).latent.numpy().astype(np.float32)
    log = ErrorLog.log_spaced(len(latent), lo=1e-3, hi=10.0, nbins=20)
    log.update(np.arange(len(latent)), np.exp(np.random.default_rng(0).normal(-3.0, 0.7, len(latent))))
    log.end_epoch()
    LTAUEstimator.build(latent, log, k=5, metadata={"model_hash": adapter.card.model_hash}).save(root / "est")
    return {"model": str(root / "tiny.model"), "est": str(root / "est"), "elements": "C Si",
            "masses": "mass 1 12.011\nmass 2 28.0855", "pair_options": "allow_pickle yes",
            "fix_options": "metric distance", **cells}


WIDE = r"""
import json
import numpy as np, torch
from mpi4py import MPI
from ltau_lmp.lammps import driver, pair

real_compute, seen = pair.PairRuntime.compute, {}

def compute(self, a):
    # the first force call: exchange 300-column rows (3 rounds of the plugin's 128) both ways
    if not seen:
        nall = a.nlocal + a.nghost
        tag = np.ctypeslib.as_array(a.tag, (nall,)).astype(np.float64)
        exchange = pair.GhostExchange(a.exchange, self.handle, nall)
        expected = torch.from_numpy(tag[:, None] * 1000 + np.arange(300.0))
        rows = torch.full((nall, 300), -1.0, dtype=torch.float64)
        rows[:a.nlocal] = expected[:a.nlocal]
        seen["forward_ok"] = bool(torch.equal(exchange(rows), expected))
        ones = torch.ones((nall, 300), dtype=torch.float32, requires_grad=True)
        (grad,) = torch.autograd.grad(exchange(ones), ones, torch.ones(nall, 300))
        seen["uniform"] = bool((grad == grad[:, :1]).all())
        seen["ghost_rows_zero"] = bool((grad[a.nlocal:] == 0).all())
        seen["copies"] = float(grad[:a.nlocal, 0].sum())   # each atom: itself + its ghost copies
        seen["nall"] = nall
    real_compute(self, a)

pair.PairRuntime.compute = compute
lmp = driver.create_lammps(log="none", screen=False)
lmp.file("in.exchange")
lmp.close()
comm = MPI.COMM_WORLD
result = {k: comm.allreduce(v) if k in ("copies", "nall") else all(comm.allgather(v)) for k, v in seen.items()}
if comm.Get_rank() == 0:
    json.dump(result, open("wide.json", "w"))
"""


@pytest.mark.mpi
def test_exchange_rows_wider_than_a_round_through_relays(files, tmp_path):
    """The exchange op itself on 3 ranks (ghosts of ghosts relayed), 300 columns: forward puts
    each owner's row on all its ghost copies; the backward (reverse, float32 rows) counts, for
    each atom, itself and all its copies on every rank, and leaves ghost rows 0."""
    (tmp_path / "in.exchange").write_text(SCRIPT.format(mode="exchange", **files))
    (tmp_path / "wide.py").write_text(WIDE)
    res = mpirun([sys.executable, "wide.py"], tmp_path, 3, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    result = json.loads((tmp_path / "wide.json").read_text())
    assert result["forward_ok"] and result["uniform"] and result["ghost_rows_zero"]
    assert result["copies"] == result["nall"]


FAILING = r"""
import sys
from mpi4py import MPI
from ltau_lmp.lammps import driver, pair

rank = MPI.COMM_WORLD.Get_rank()
real_call, real_backward = pair.GhostExchange.__call__, pair._GhostRows.backward
calls = {"n": 0}

def fail_between(self, rows):              # rank 1, before its 2nd exchange
    calls["n"] += 1
    if rank == 1 and calls["n"] == 2:
        raise RuntimeError("injected failure between exchanges")
    return real_call(self, rows)

def fail_in_backward(ctx, grad):           # rank 1, in the backward, before its reverse exchange
    if rank == 1:
        raise ValueError("injected failure in the backward")
    return real_backward(ctx, grad)

with open(f"results.{rank}", "w") as out:
    for name, cls, attr, patch in (("between", pair.GhostExchange, "__call__", fail_between),
                                   ("backward", pair._GhostRows, "backward", staticmethod(fail_in_backward))):
        original = cls.__dict__[attr]
        setattr(cls, attr, patch)
        lmp = driver.create_lammps(log="none", screen=False)
        try:
            lmp.file("in.exchange")
            out.write(f"{name} OK\n")
        except Exception as exc:
            out.write(f"{name} ERROR " + " ".join(str(exc).split()) + "\n")
        out.flush()
        lmp.close()
        setattr(cls, attr, original)
"""


@pytest.mark.mpi
def test_failure_on_one_rank_stops_every_rank(files, tmp_path):
    (tmp_path / "in.exchange").write_text(SCRIPT.format(mode="exchange", **files))
    (tmp_path / "failing.py").write_text(FAILING)
    res = mpirun([sys.executable, "failing.py"], tmp_path, 2, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    expected = {"between": "RuntimeError: injected failure between exchanges",
                "backward": "ValueError: injected failure in the backward"}
    for rank in (0, 1):
        got = dict(line.split(" ", 1) for line in (tmp_path / f"results.{rank}").read_text().splitlines())
        for case, message in expected.items():
            assert got[case].startswith("ERROR") and "Pair style ltau" in got[case] and message in got[case], \
                (rank, case, got[case])


def _card(num_layers=2, ghost_exchange=False):
    return ModelCard(family="test", species=("Si",), cutoff=4.0, num_layers=num_layers,
                     receptive_field=4.0 * num_layers, latent_dim=4, latent="test", dtype="float64",
                     model_hash="0" * 64, ghost_exchange=ghost_exchange)


def test_message_passing_keyword_and_mode():
    assert PairOptions.parse([]).message_passing is None
    assert PairOptions.parse(["message_passing", "shell"]).message_passing == "shell"
    with pytest.raises(LTAUError, match="message_passing must be exchange or shell, got 'thick'"):
        PairOptions.parse(["message_passing", "thick"])
    able, unable = _card(ghost_exchange=True), _card()
    assert message_passing_mode(able, None) == message_passing_mode(able, "exchange") == abi.MP_EXCHANGE
    assert message_passing_mode(able, "shell") == abi.MP_SHELL
    assert message_passing_mode(unable, None) == message_passing_mode(unable, "shell") == abi.MP_SHELL
    with pytest.raises(LTAUError, match="cannot exchange ghost node features .* use message_passing shell"):
        message_passing_mode(unable, "exchange")
    for requested in (None, "exchange", "shell"):           # a strictly local model needs neither
        assert message_passing_mode(_card(num_layers=1), requested) == abi.MP_LOCAL
