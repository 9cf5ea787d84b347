"""Words of the messages of ``pair_style ltau`` and ``fix ltau``: counts and atom lists."""

from __future__ import annotations

import numpy as np


def plural(n: int, word: str) -> str:
    """``1 atom``, ``3 atoms``: counts in messages read as English."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def describe_tags(tags, limit: int = 10) -> str:
    """``atom IDs 3, 7 and 12`` (at most ``limit`` listed, sorted): which atoms a message is about."""
    tags = sorted(int(t) for t in np.unique(tags))
    shown = ", ".join(map(str, tags[:limit]))
    more = f" and {len(tags) - limit:,} more" if len(tags) > limit else ""
    return f"atom ID{'s' if len(tags) > 1 else ''} {shown}{more}"
