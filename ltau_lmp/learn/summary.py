"""The live per-round table of ``ltau-lmp learn`` (rich): one row per round, redrawn after every
stage, with the loop's messages printed above it; plain lines where the output is not a terminal."""

from __future__ import annotations

from contextlib import contextmanager


def bookkeeping_seconds(stages: dict) -> float | None:
    """Seconds of a round spent on anything but MD, reference calculations and training: the train
    and explore stages' own overhead plus the whole select and label stages (the reference time
    included: an upper bound). None before the round's train and explore have finished."""
    train, explore = stages.get("train"), stages.get("explore")
    if train is None or explore is None or "trainer_seconds" not in train or "md_seconds" not in explore:
        return None
    extra = sum((stages.get(s) or {}).get("seconds", 0.0) for s in ("select", "label"))
    return train["seconds"] - train["trainer_seconds"] + explore["seconds"] - explore["md_seconds"] + extra


def round_table(manifest: dict):
    """A rich ``Table`` of every round so far."""
    from rich.table import Table

    table = Table(title=f"ltau-lmp learn: {sum(_labelled(r) for r in manifest['rounds'])} labels", title_justify="left")
    for column in ("round", "train", "explore", "selected", "labelled", "bookkeeping"):
        table.add_column(column, justify="left" if column == "explore" else "right")
    for rnd in manifest["rounds"]:
        stages = rnd["stages"]
        train, explore = stages.get("train"), stages.get("explore")
        protocols = "; ".join(f"{name} {_status(p)}" for name, p in (explore or {}).get("protocols", {}).items())
        overhead = bookkeeping_seconds(stages)
        total = sum(s["seconds"] for s in stages.values())
        table.add_row(
            str(rnd["round"]),
            f"{train['seconds']:.0f} s, {train['structures']} structures" if train else "…",
            f"{protocols} ({explore['seconds']:.0f} s)" if explore else "",
            str(stages["select"]["selected"]) if "select" in stages else "",
            (str(_labelled(rnd)) + (f" ({len(stages['label']['failed'])} failed)" if stages["label"]["failed"] else "")
             if "label" in stages else ""),
            f"{overhead:.1f} s ({100 * overhead / total:.1f} %)" if overhead is not None and total else "")
    return table


def _labelled(rnd: dict) -> int:
    return (rnd["stages"].get("label") or {}).get("labelled", 0)


def _status(p: dict) -> str:
    where = {"halted": f"halted@{p['halt_step']}", "completed": f"done@{p['final_step']}", "failed": "FAILED"}
    reps = p.get("replicas") or []
    return where[p["status"]] + (f" x{len(reps)}" if len(reps) > 1 else "")


class Summary:
    """What the loop talks through: ``say`` a line, ``update`` the table."""

    def __init__(self, manifest: dict, live=None, enabled: bool = True):
        self.manifest, self.live, self.enabled = manifest, live, enabled

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)

    def update(self) -> None:
        if self.live is not None:
            self.live.update(round_table(self.manifest))


@contextmanager
def live_summary(manifest: dict, enabled: bool):
    """A ``Summary`` whose table is redrawn in place on a terminal (plain lines otherwise)."""
    import sys

    if not enabled or not sys.stdout.isatty():
        yield Summary(manifest, enabled=enabled)
        return
    from rich.live import Live

    with Live(round_table(manifest), auto_refresh=False, transient=False) as live:
        yield Summary(manifest, live)
