"""The learn loop's per-round table and its bookkeeping figure (everything but MD, reference and training)."""

from __future__ import annotations

import pytest
from rich.console import Console

from ltau_lmp.learn.summary import bookkeeping_seconds, round_table

MANIFEST = {"rounds": [
    {"round": 0, "stages": {
        "train": {"seconds": 10.0, "trainer_seconds": 9.0, "structures": 20, "labels": 0},
        "explore": {"seconds": 20.0, "md_seconds": 18.0, "protocols": {
            "nvt": {"status": "halted", "halt_step": 310, "final_step": 310, "replicas": [{}, {}]},
            "heat": {"status": "completed", "halt_step": None, "final_step": 6000, "replicas": [{}]}}},
        "select": {"seconds": 1.0, "selected": 8},
        "label": {"seconds": 2.0, "labelled": 7, "failed": [{"key": "k"}]}}},
    {"round": 1, "stages": {"train": {"seconds": 5.0, "trainer_seconds": 4.5, "structures": 27, "labels": 7}}}]}


def test_bookkeeping_counts_all_but_md_reference_and_training():
    # (10 - 9) + (20 - 18) + select 1 + label 2 (its reference time included: an upper bound)
    assert bookkeeping_seconds(MANIFEST["rounds"][0]["stages"]) == pytest.approx(6.0)
    assert bookkeeping_seconds(MANIFEST["rounds"][1]["stages"]) is None  # not explored yet


def test_round_table_shows_every_round():
    console = Console(record=True, width=200)
    console.print(round_table(MANIFEST))
    text = console.export_text()
    assert "7 labels" in text
    assert "nvt halted@310 x2; heat done@6000 (20 s)" in text
    assert "7 (1 failed)" in text
    assert "6.0 s (18.2 %)" in text           # 6 s of a 33 s round
    assert "5 s, 27 structures" in text
