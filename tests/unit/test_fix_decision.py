"""fix ltau's evaluation and decision on one rank, without LAMMPS or MPI: the per-rank query
(fix_step.evaluate_rank), the summary rows every rank contributes (fix_step.summary_row), and
the rules that turn the rows of all ranks into global values, dumps and halts
(fix_decision.Outcome, Decider)."""

from types import SimpleNamespace

import numpy as np
import pytest

from ltau_lmp.errors import LTAUError
from ltau_lmp.lammps.features import PairFeatures
from ltau_lmp.lammps.fix_decision import Decider, Outcome
from ltau_lmp.lammps.fix_options import FixOptions
from ltau_lmp.lammps.fix_step import ROW, StepView, badness, crossed, evaluate_rank, summary_row


def view(tag, in_group, step=10, ncols=4, check_halt=True):
    n = len(tag)
    return StepView(step=step, x=np.zeros((n, 3)), f=np.zeros((n, 3)), type=np.ones(n, np.int32),
                    tag=np.asarray(tag, np.int32), in_group=np.asarray(in_group, bool),
                    peratom=np.zeros((n, ncols)), global_out=np.zeros(1 + ncols + 1), check_halt=check_halt)


class FakeEstimator:
    """expected = the latent's first column, distance = its second, p-value = its third."""

    def query(self, latent, k=None):
        class Result:
            expected, distance, ood = latent[:, 0] * 1.0, latent[:, 1] * 1.0, latent[:, 2] * 1.0

            def __len__(self):
                return len(latent)

            def interval(self, lo, hi):
                return np.column_stack([latent[:, 0] * lo, latent[:, 0] * hi])
        return Result()


def features(step, tags, latent):
    f = PairFeatures()
    f.configure(SimpleNamespace(), ["Si"])
    f.publish(step, np.asarray(tags, np.int32), np.asarray(latent, np.float32))
    return f


def test_evaluate_rank_fills_the_group_and_scores_badness():
    latent = [[0.5, 2.0, 0.3], [0.9, 1.0, 0.01], [7.0, 9.0, 0.5]]
    v = view([4, 2, 9], [True, True, False], ncols=5)
    score = evaluate_rank(features(10, [4, 2, 9], latent), FakeEstimator(), FixOptions("e", ci=(0.1, 0.9)), True, v)
    np.testing.assert_allclose(v.peratom[:2], [[0.5, 0.05, 0.45, 2.0, 0.3], [0.9, 0.09, 0.81, 1.0, 0.01]], rtol=1e-6)
    assert (v.peratom[2] == 0).all() and score[2] == 0            # outside the group: zeros
    np.testing.assert_allclose(score[:2], [0.5, 0.9], rtol=1e-6)
    ood = evaluate_rank(features(10, [4, 2, 9], latent), FakeEstimator(), FixOptions("e", metric="ood"), True, v)
    np.testing.assert_allclose(ood[:2], [-0.3, -0.01], rtol=1e-6)   # a p-value is worse when smaller


@pytest.mark.parametrize("step,tags,latent,message", [
    (9, [1, 2], [[0, 0, 1]] * 2, "no features for step 10 \\(pair_style ltau last ran at step 9\\)"),
    (10, [2, 1], [[0, 0, 1]] * 2, "atoms changed between the force call and the end of step 10"),
    (10, [1, 2], [[0, 0, 1], [np.nan, 0, 1]], "non-finite .* latent features for atom ID 2:"),
])
def test_evaluate_rank_refuses_stale_or_broken_features(step, tags, latent, message):
    with pytest.raises(LTAUError, match=message):
        evaluate_rank(features(step, tags, latent), FakeEstimator(), FixOptions("e"), False, view([1, 2], [1, 1]))


def rows_of(metric, views_scores, thresholds):
    return np.array([summary_row(metric, v, s, thresholds) for v, s in views_scores])


def test_two_ranks_reduce_to_what_one_rank_gives():
    """Rows of two ranks give the global values of one rank holding all atoms; the worst tag is
    the smallest tag holding the worst value on any rank."""
    tags, expected, dist = np.array([5, 3, 8, 1, 7]), np.array([0.2, 0.9, 0.9, 0.1, 0.4]), np.arange(5.0)
    group = np.array([True, True, True, False, True])

    def part(idx):
        v = view(tags[idx], group[idx])
        v.peratom[:, 0], v.peratom[:, 3] = expected[idx], dist[idx]
        return v, np.where(group[idx], expected[idx], 0.0)

    thresholds = {"dump": 0.3, "halt": 0.5}
    one = Outcome.of("expected", rows_of("expected", [part(np.arange(5))], thresholds))
    two = Outcome.of("expected", rows_of("expected", [part(np.arange(2)), part(np.arange(2, 5))], thresholds))
    assert one == Outcome(**{**two.__dict__, "mean": pytest.approx(two.mean)})
    assert (one.worst, one.n_dump, one.n_halt, one.max_distance, one.worst_tag) == (0.9, 3, 2, 4.0, 3)
    assert one.mean == pytest.approx((0.2 + 0.9 + 0.9 + 0.4) / 4)
    assert one.global_values(False) == [0.9, 0.9, one.mean, 3, 2, 4.0]


def test_empty_group_is_never_an_alarm():
    v = view([1, 2], [False, False], ncols=5)
    rows = rows_of("ood", [(v, np.zeros(2))] * 2, {"dump": 0.5, "halt": 0.5})
    out = Outcome.of("ood", rows)
    assert out.global_values(True) == [1.0, 1.0, 1.0, 0, 0, 0.0, 1.0]     # p-value 1, nothing over
    assert out.worst_tag == 0 and Outcome.of("expected", rows).worst == 0.0
    assert rows.shape == (2, len(ROW))


def test_ood_threshold_is_crossed_at_or_below():
    score = badness("ood", np.array([0.01, 0.02, 0.5]))
    assert crossed("ood", score, 0.02).tolist() == [True, True, False]
    assert crossed("expected", np.array([0.1, 0.2]), 0.1).tolist() == [False, True]


def one_rank_rows(worst, n_over, tag=7):
    return np.array([[10, worst * 10, n_over, n_over, worst, 1.0, 0.0, tag]], dtype=float)


def test_decider_halts_with_the_persistence_rule_and_the_same_message():
    opts = FixOptions.parse("e halt 0.5 over 2 within 3".split())
    d = Decider("u", opts, opts.halt, None, None, [])
    assert d.decide(1, one_rank_rows(0.9, 1), d.thresholds(10), check_halt=True).halt is None      # 1 of 2 so far
    assert d.decide(2, one_rank_rows(0.9, 4), d.thresholds(10), check_halt=False).halt is None     # setup: not a check
    halt = d.decide(3, one_rank_rows(0.9, 4), d.thresholds(10), check_halt=True).halt
    assert halt == ("u condition met on step 3 with value 0.9: expected uncertainty exceeds the halt threshold "
                    "0.5 (atom tag 7, 4 atoms over, 2 of the last 3 evaluations)")
    # the rule starts over after an alarm
    assert d.decide(4, one_rank_rows(0.9, 1), d.thresholds(10), check_halt=True).halt is None


def test_decider_rate_limits_dumps_and_never_repeats_a_step():
    opts = FixOptions.parse("e dump f.xyz 0.5 interval 10 max 2".split())
    d = Decider("u", opts, None, opts.dump_threshold, None, [5])                  # step 5 is in the file
    dumped = [s for s in (5, 10, 15, 20, 30, 40) if d.decide(s, one_rank_rows(0.9, 1), d.thresholds(10), False).dump]
    assert dumped == [15] and d.dump_steps == [5, 15]                             # interval 10, then max 2
    assert not d.decide(50, one_rank_rows(0.1, 0), d.thresholds(10), False).dump


def test_the_halting_frame_is_dumped_whatever_the_interval():
    opts = FixOptions.parse("e halt 0.8 dump f.xyz 0.5 interval 20".split())
    d = Decider("u", opts, opts.halt, opts.dump_threshold, None, [])
    under_halt = one_rank_rows(0.6, 1)
    under_halt[0, 3] = 0                                                              # n over halt
    assert d.decide(150, under_halt, d.thresholds(10), True).dump                    # over dump, under halt
    quiet = d.decide(160, under_halt, d.thresholds(10), True)
    assert not quiet.dump and quiet.halt is None                                      # within the interval
    halting = d.decide(170, one_rank_rows(0.9, 1), d.thresholds(10), True)
    assert halting.halt is not None and halting.dump and d.dump_steps == [150, 170]


def test_auto_thresholds_follow_the_watched_atoms():
    alarm = {"false_alarm_rate": 0.01, "n_reference": 99, "expected": 0.7, "ood": 0.01,
             "distance_tail": {"fitted": True}, "expected_tail": None}
    opts = FixOptions.parse("e metric ood halt auto dump f.xyz 0.2".split())
    d = Decider("u", opts, opts.halt, opts.dump_threshold, alarm, [])
    assert d.uses_auto and not Decider("u", opts, 0.1, 0.2, alarm, []).uses_auto
    assert d.thresholds(1) == {"dump": 0.2, "halt": 0.01}
    assert d.thresholds(10) == {"dump": 0.2, "halt": pytest.approx(0.001)}      # a / M for M watched atoms
    rows = one_rank_rows(-0.0005, 1)
    rows[0, 0] = 10
    assert "the halt threshold 0.001 " in d.decide(1, rows, d.thresholds(10), check_halt=True).halt
