"""Which device and how many threads each MPI rank uses (torch model, faiss index).

Shared by the pair style's runtime and ``fix ltau``; kept apart so that neither imports the other.
"""

from __future__ import annotations

import os

import torch


def local_rank(comm=None) -> tuple[int, int]:
    """(rank, size) among the ranks of ``comm`` (default COMM_WORLD) on this node, for any
    launcher: MPI's shared-memory split. Collective over ``comm``."""
    from mpi4py import MPI

    node = (comm or MPI.COMM_WORLD).Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def select_device(comm=None) -> torch.device:
    """One GPU per rank (by local rank) when CUDA is available, else the CPU. Collective.

    On the CPU the cores are shared out between the ranks of the node, unless the user set
    OMP_NUM_THREADS (torch already honours it); oversubscription slows every rank down.
    """
    rank, size = local_rank(comm)
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // max(1, size)))
    return torch.device("cpu")


def faiss_gpu_device(comm=None) -> int | None:
    """The GPU this rank searches its faiss index on (local rank modulo GPUs), None without
    faiss-gpu. Collective (whether or not faiss-gpu is there)."""
    rank, _ = local_rank(comm)    # first: every rank takes part, whatever fails after
    from ltau_lmp.estimator import gpu_available

    if not gpu_available():
        return None
    import faiss

    return rank % faiss.get_num_gpus()
