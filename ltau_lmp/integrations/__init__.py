"""LTAU for force fields trained by other codes' trainers.

``replay``: an error log from per-epoch checkpoints, for any trainer that keeps them.
``mace``: per-atom error logging from MACE's own, unchanged trainer (imports mace-torch).
``cli``: ``ltau-lmp mace-train`` and ``ltau-lmp replay``.

Submodules are imported on use, so this package costs nothing when MACE is not installed.
"""
