"""The gate's decision on hand-made measurements: no model needed."""

from __future__ import annotations

from assistant.sleep.gate import GateSettings, Measurement, better, decide, kept_share

SETTINGS = GateSettings()  # in-context tolerance 1.5 points, retention tolerance 5%


def test_a_night_that_recalls_more_and_keeps_everything_is_promoted():
    verdict = decide(Measurement(0.0, 0.8, 0.70), Measurement(0.5, 0.8, 0.69), 10, SETTINGS)
    assert verdict.promote and verdict.retention == 1.0


def test_reading_must_hold_against_the_model_before_its_first_night_too():
    """Each earlier night lost a point and passed; tonight's loss of one more would pass against
    tonight's live model, but not against the reading before the first night."""
    before, after = Measurement(0.0, 0.8, 0.68), Measurement(0.5, 0.8, 0.67)
    assert decide(before, after, 10, SETTINGS).promote
    verdict = decide(before, after, 10, SETTINGS, reading_base=0.70)
    assert not verdict.promote and verdict.reason == "in-context reading fell (70% -> 67%)"
    # a stack that reads better than the bare model is held to its own reading
    assert not decide(Measurement(0.0, 0.8, 0.75), after, 10, SETTINGS, reading_base=0.70).promote


def test_old_memories_that_fade_beyond_the_tolerance_are_a_rejection():
    verdict = decide(Measurement(0.0, 0.8, 0.70), Measurement(0.5, 0.72, 0.70), 10, SETTINGS)
    assert not verdict.promote and verdict.reason == "old memories faded (retention 90%)"


def test_a_tie_keeps_the_incumbent_and_only_a_promotable_candidate_can_win():
    before = Measurement(0.0, None, 0.70)
    low, high = (decide(before, Measurement(recall, None, 0.70), 10, SETTINGS) for recall in (0.3, 0.5))
    rejected = decide(before, Measurement(0.9, None, 0.50), 10, SETTINGS)
    assert better(high, low) and not better(low, high) and not better(low, low)
    assert not better(rejected, low) and better(low, rejected)


def test_old_memories_hold_against_what_the_stack_once_answered_not_only_tonight():
    """Last night lost 2 of 40 old answers and passed; tonight loses one more, which passes
    against tonight's live model (37 of 38) but not against what the stack once answered (37 of 40)."""
    before = Measurement(0.0, 38 / 40, 0.70, (True,) * 38 + (False,) * 2)
    after = Measurement(0.5, 37 / 40, 0.70, (True,) * 37 + (False,) * 3)
    assert decide(before, after, 10, SETTINGS).promote
    verdict = decide(before, after, 10, SETTINGS, known=(True,) * 40)
    assert not verdict.promote and verdict.reason == "old memories faded (retention 92%)"
    assert kept_share(38 / 40, 37 / 40, after.old_hits, (True,) * 40) == verdict.retention == 37 / 40
    # what the stack never answered is not held against it
    assert decide(before, after, 10, SETTINGS, known=before.old_hits).promote
