"""Figures of a learning-loop run (``ltau-lmp learn``), drawn from its manifest at the end:
labels per round, steps each protocol survived per round, predicted against true errors of the
labelled frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ltau_lmp.evaluation.plots import ERROR_UNIT, _figure, _save, _title


def learn_figures(manifest: dict, out: Path) -> dict[str, str]:
    """Write the three figures into ``out``; returns {name: path}."""
    rounds = manifest["rounds"]
    figures = {}
    fig = _figure((5.5, 3.5))
    ax = fig.add_subplot()
    labelled = [rnd["stages"].get("label", {}).get("labelled", 0) for rnd in rounds]
    ax.bar(range(len(rounds)), labelled, color="C0")
    ax.set_xlabel("round")
    ax.set_ylabel("frames labelled")
    _title(fig, f"Labels per round ({sum(labelled)} in all)")
    figures["labels"] = _save(fig, out / "labels_per_round.png")

    fig = _figure((6.0, 3.8))
    ax = fig.add_subplot()
    names = sorted({name for rnd in rounds for name in rnd["stages"].get("explore", {}).get("protocols", {})})
    for name in names:
        steps, halted = [], []
        for rnd in rounds:
            res = rnd["stages"].get("explore", {}).get("protocols", {}).get(name)
            steps.append(np.nan if res is None else (res["final_step"] or 0))
            halted.append(res is not None and res["status"] == "halted")
        line, = ax.plot(range(len(rounds)), steps, marker="o", label=name)
        ax.plot([r for r, h in enumerate(halted) if h], [s for s, h in zip(steps, halted) if h], "x", ms=9,
                color=line.get_color())
    ax.set_xlabel("round")
    ax.set_ylabel("step reached (x: halted by fix ltau)")
    ax.legend(fontsize="small")
    _title(fig, "How far each protocol ran before an alarm")
    figures["steps"] = _save(fig, out / "steps_per_round.png")

    pairs = [(p, t, rnd["round"]) for rnd in rounds for p, t in rnd["stages"].get("label", {}).get("errors", [])]
    if pairs:
        fig = _figure((4.8, 4.5))
        ax = fig.add_subplot()
        p, t, r = (np.array(v, dtype=float) for v in zip(*pairs))
        points = ax.scatter(t, p, c=r, cmap="viridis", s=14)
        lo, hi = min(p.min(), t.min()) / 1.5, max(p.max(), t.max()) * 1.5
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"true max force error of the frame ({ERROR_UNIT})")
        ax.set_ylabel(f"LTAU's largest expected error ({ERROR_UNIT})")
        fig.colorbar(points, ax=ax, label="round")
        _title(fig, "Labelled frames: predicted vs true error (the model that flagged them)")
        figures["errors"] = _save(fig, out / "predicted_vs_true.png")
    return figures
