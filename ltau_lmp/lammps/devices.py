"""Which device and how many threads each MPI rank uses (torch model, faiss index).

Shared by the pair style's runtime and ``fix ltau``; kept apart so that neither imports the other.
"""

from __future__ import annotations

import os

import torch


def local_rank() -> tuple[int, int]:
    """(rank, size) among the ranks of this node, from the launcher's environment."""
    for rank_var, size_var in (("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
                               ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                               ("SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")):
        if rank_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ.get(size_var, "1").split("(")[0])
    return 0, 1


def select_device() -> torch.device:
    """One GPU per rank (by local rank) when CUDA is available, else the CPU.

    On the CPU the cores are shared out between the ranks of the node, unless the user set
    OMP_NUM_THREADS (torch already honours it); oversubscription slows every rank down.
    """
    rank, size = local_rank()
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, (cores or 1) // max(1, size)))
    return torch.device("cpu")


def faiss_gpu_device() -> int | None:
    """The GPU this rank searches its faiss index on (local rank modulo GPUs), None without faiss-gpu."""
    from ltau_lmp.estimator import gpu_available

    if not gpu_available():
        return None
    import faiss

    return local_rank()[0] % faiss.get_num_gpus()
