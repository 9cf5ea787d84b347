"""The collective protocol of code that runs on every MPI rank inside one LAMMPS call.

A rank must never enter a collective MPI call (an allreduce, a LAMMPS ghost exchange) alone:
when rank-local work fails on one rank, the others must learn of it in the next collective
call and stop quietly, while the failing rank reports. Used by ``pair_style ltau``'s ghost
exchange, ``fix ltau`` and model adapters that exchange node features (doc/architecture.md);
mpi4py is imported only when a collective call is made.
"""

from __future__ import annotations

import numpy as np


class PeerFailed(Exception):
    """Another rank failed in the same call: this rank stops quietly, that rank reports."""


class HaltCondition(Exception):
    """The halt threshold of ``fix ltau`` is crossed (same step, same message on every rank);
    the plugin applies fix halt's mode: error hard, soft or continue."""


def agree(comm, work):
    """Run rank-local ``work``, then make sure no rank enters a collective call alone.

    The failing rank re-raises its own error; the others raise ``PeerFailed``, which the runtime
    turns into status OK: the plugin reduces the statuses and shows the failing rank's message.
    """
    from mpi4py import MPI

    try:
        result, failed = work(), 0
    except Exception:
        comm.allreduce(1, op=MPI.MAX)
        raise
    if comm.allreduce(failed, op=MPI.MAX):
        raise PeerFailed()
    return result


def agree_gather(comm, work, width: int):
    """``agree`` and an allgather in one collective call.

    ``work()`` returns ``(row, result)``: ``row`` is this rank's ``width`` float64 summary.
    Returns ``(rows, result)`` with ``rows`` (ranks, width), every rank's row, the same on all
    ranks. A rank whose work raised re-raises after the call; the others raise ``PeerFailed``.
    """
    rows = np.empty((comm.Get_size(), width + 1))
    try:
        row, result = work()
        send = np.concatenate(([0.0], np.asarray(row, dtype=np.float64).reshape(width)))
    except Exception:
        comm.Allgather(np.ones(width + 1), rows)
        raise
    comm.Allgather(send, rows)
    if rows[:, 0].any():
        raise PeerFailed()
    return rows[:, 1:], result
