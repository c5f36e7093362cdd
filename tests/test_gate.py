"""The gate: likelihoods of answers, the one-sided bound on recall's gain, and the decision."""

from __future__ import annotations

import math

import pytest

from assistant.sleep import gate
from assistant.sleep.gate import RECALL_MARGIN, Measurement, Probe, Readings
from assistant.sleep.lessons import knowledge_context, user_turn
from tests.fakes import CONFIDENT, UNKNOWN, VOCAB, Fact, FakeTrainer, render_chat

DOG = Fact("My dog is called Rex.", ("What is my dog called?",), "Your dog is called Rex.")
OWN = -math.log(1 + (VOCAB - 1) * math.exp(-CONFIDENT))  # the fake's own next token
MISSED = -math.log(math.exp(CONFIDENT) + VOCAB - 1)  # the token where an answer leaves the fake's own
UNIFORM = -math.log(VOCAB)  # every token after that: the fake has no opinion


# -- one_sided_lower ---------------------------------------------------------------------------------

def test_the_lower_bound_is_the_mean_less_t_standard_errors():
    # mean 3, sample sd sqrt(2.5), n 5: t(0.95, 4 df) = 2.132
    assert gate.one_sided_lower([1, 2, 3, 4, 5]) == pytest.approx(3 - 2.132 * math.sqrt(2.5) / math.sqrt(5), abs=0.005)
    # two values: t(0.95, 1 df) = 6.314, sd = |a - b| / sqrt(2)
    assert gate.one_sided_lower([1.0, 3.0]) == pytest.approx(2 - 6.314 * math.sqrt(2) / math.sqrt(2), abs=0.005)
    # ten values: t(0.95, 9 df) = 1.833
    values = [0.5, 1.2, -0.3, 0.8, 2.0, 1.1, 0.0, 0.9, 1.4, 0.6]
    mean = sum(values) / 10
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 9)
    assert gate.one_sided_lower(values) == pytest.approx(mean - 1.833 * sd / math.sqrt(10), abs=0.005)


def test_many_values_use_the_normal_quantile_and_equal_values_have_no_noise():
    values = [float(i % 7) for i in range(200)]
    mean = sum(values) / 200
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 199)
    assert gate.one_sided_lower(values) == pytest.approx(mean - 1.645 * sd / math.sqrt(200), abs=0.01)
    assert gate.one_sided_lower([0.7] * 6) == pytest.approx(0.7)


def test_fewer_than_two_values_bound_nothing():
    assert gate.one_sided_lower([]) == -math.inf
    assert gate.one_sided_lower([5.0]) == -math.inf


def test_the_bound_grows_with_more_of_the_same_evidence():
    few, many = [1.0, 2.0, 0.5, 1.5], [1.0, 2.0, 0.5, 1.5] * 4
    assert gate.one_sided_lower(few) < gate.one_sided_lower(many) < 1.25


@pytest.mark.parametrize("n, t", [(12, 1.796), (22, 1.721), (32, 1.696)])  # t(0.95, n - 1)
def test_the_bound_is_never_looser_than_students_t(n, t):
    values = [float(i % 3) for i in range(n)]
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    assert gate.one_sided_lower(values) <= mean - (t - 0.01) * sd / math.sqrt(n)  # the table's rounding allowed


# -- logprob -----------------------------------------------------------------------------------------

def _asked(question: str, said: str | None = DOG.said) -> str:
    context = knowledge_context([{"role": "user", "content": said}]) if said else []
    return render_chat(context + user_turn(question))


def _tokens(text: str) -> int:
    return len(text.encode("utf-8")) + 1  # the fake's bytes, and its end of turn


def test_the_models_own_answer_scores_near_zero():
    trainer = FakeTrainer([DOG])
    [own] = gate.logprob(trainer, [_asked("What is my dog called?")], [DOG.answer], new_block=False)
    assert own == pytest.approx(_tokens(DOG.answer) * OWN, abs=1e-4)
    assert -0.05 < own < 0


def test_another_answer_scores_minus_log_vocab_per_token_after_leaving_the_models():
    trainer = FakeTrainer([DOG])
    other = "Your cat is called Tom."  # leaves "Your dog ..." at its sixth token
    [score] = gate.logprob(trainer, [_asked("What is my dog called?")], [other], new_block=False)
    assert score == pytest.approx(5 * OWN + MISSED + (_tokens(other) - 6) * UNIFORM)
    [bare] = gate.logprob(trainer, [_asked("What is my dog called?", said=None)], [DOG.answer], new_block=False)
    assert bare == pytest.approx(MISSED + (_tokens(DOG.answer) - 1) * UNIFORM)  # without the session: "I don't know."
    assert bare / _tokens(DOG.answer) == pytest.approx(-math.log(VOCAB), abs=0.5)


def test_the_end_of_turn_is_part_of_the_answer():
    trainer = FakeTrainer([DOG])
    cut = UNKNOWN[:7]  # "I don't": every token the fake's own, but it would go on, not end its turn
    [score] = gate.logprob(trainer, [_asked("Where is John?", said=None)], [cut], new_block=False)
    assert score == pytest.approx(7 * OWN + MISSED)
    [whole] = gate.logprob(trainer, [_asked("Where is John?", said=None)], [UNKNOWN], new_block=False)
    assert whole == pytest.approx(_tokens(UNKNOWN) * OWN, abs=1e-4)


def test_batches_change_nothing_and_keep_the_order():
    trainer = FakeTrainer([DOG])
    prompts = [_asked("What is my dog called?"), _asked("What is my dog called?", said=None)] * 3 + [_asked("Hi?")]
    answers = [DOG.answer, DOG.answer, UNKNOWN, "Rex.", "x", DOG.answer, UNKNOWN]
    one = gate.logprob(trainer, prompts, answers, new_block=False, batch=len(prompts))
    assert gate.logprob(trainer, prompts, answers, new_block=False, batch=2) == pytest.approx(one)
    assert [gate.logprob(trainer, [p], [a], new_block=False)[0] for p, a in zip(prompts, answers)] == pytest.approx(one)
    assert gate.logprob(trainer, [], [], new_block=False) == []


def test_measure_asks_probes_and_earlier_answers_without_the_session():
    trainer = FakeTrainer([DOG])
    probes = [Probe("What is my dog called?", DOG.answer, 1), Probe("Where is John?", UNKNOWN, 1)]
    old = [Probe("What is my cat called?", UNKNOWN, 0)]
    readings = Readings((_asked("What is my dog called?"),), (DOG.answer,), (0.0,))
    measured = gate.measure(trainer, render_chat, probes, old, readings, new_block=False)
    assert len(measured.new) == 2 and len(measured.old) == 1 and len(measured.reading) == 1
    assert measured.new[0] < -50  # without the session the fake does not know the dog
    assert measured.new[1] > -0.1 and measured.old[0] > -0.1 and measured.reading[0] > -0.1


# -- recalled and decide -----------------------------------------------------------------------------

def test_a_probe_is_recalled_within_the_margin_of_the_teachers_certainty():
    probes = [Probe("a?", "A.", 1, taught=-1.0), Probe("b?", "B.", 1, taught=-2.0)]
    assert gate.recalled([-1.0 - RECALL_MARGIN, -2.0 - RECALL_MARGIN - 0.01], probes) == 0.5
    assert gate.recalled([0.0, -2.0 - RECALL_MARGIN], probes) == 1.0
    assert gate.recalled([-30.0, -30.0], probes) == 0.0
    assert gate.recalled([], []) == 0.0
    assert RECALL_MARGIN == pytest.approx(math.log(4))


PROBES = [Probe(f"q{i}?", f"A{i}.", 1, taught=-1.0) for i in range(4)]
OLD = [Probe(f"old{i}?", f"O{i}.", 0, taught=-1.0) for i in range(2)]
READINGS = Readings(("r0", "r1"), ("R0.", "R1."), (-2.0, -3.0))
BEFORE = Measurement(new=(-20.0, -22.0, -18.0, -25.0), old=(-1.0, -1.5), reading=(-2.0, -3.0))
LEARNT = (-1.0, -1.5, -0.5, -2.0)  # every probe within the margin of the teacher's -1


def _decide(after: Measurement, before: Measurement = BEFORE, probes=PROBES, old=OLD, readings=READINGS,
            retention=1.0, reading=1.0) -> gate.Verdict:
    return gate.decide(before, after, probes, old, readings, retention_tolerance=retention, reading_tolerance=reading)


def test_a_night_whose_gains_clear_their_noise_and_keep_everything_is_promoted():
    verdict = _decide(Measurement(LEARNT, BEFORE.old, BEFORE.reading))
    assert verdict.promote and verdict.reason.startswith("recall 0% -> 100%")
    assert (verdict.recall_before, verdict.recall_after, verdict.retention) == (0.0, 1.0, 1.0)
    assert verdict.gain == pytest.approx(20.0) and verdict.gain_lower > 0 and verdict.probes == 4
    assert verdict.old_change == 0 and verdict.reading_change == 0
    assert (verdict.in_context_before, verdict.in_context_after) == (1.0, 1.0)
    assert verdict.record()["promote"] is True and verdict.record()["gain_lower"] == verdict.gain_lower


def test_a_mean_gain_within_its_noise_is_refused():
    after = Measurement((-5.0, -30.0, -3.0, -35.0), BEFORE.old, BEFORE.reading)  # gains 15, -8, 15, -10
    verdict = _decide(after)
    assert verdict.gain > 0 and verdict.gain_lower <= 0
    assert not verdict.promote and verdict.reason.startswith("recall did not rise beyond its noise")
    assert not _decide(BEFORE).promote  # nothing learnt


def test_answers_that_only_grow_likelier_without_being_recalled_are_refused():
    nudged = tuple(score + 5.0 + 0.1 * i for i, score in enumerate(BEFORE.new))  # surely likelier, still far off
    verdict = _decide(Measurement(nudged, BEFORE.old, BEFORE.reading))
    assert verdict.gain_lower > 0 and verdict.recall_after == verdict.recall_before
    assert not verdict.promote and verdict.reason.startswith("no more questions recalled")


def test_too_few_probes_are_refused_whatever_they_gain():
    for probes, new_before, new_after in (([], (), ()), (PROBES[:1], (-20.0,), (0.0,))):
        verdict = _decide(Measurement(new_after, BEFORE.old, BEFORE.reading),
                          Measurement(new_before, BEFORE.old, BEFORE.reading), probes=probes)
        assert not verdict.promote and verdict.reason.startswith("too few held-out questions")
    two = _decide(Measurement((-1.0, -1.5), BEFORE.old, BEFORE.reading),
                  Measurement((-20.0, -22.0), BEFORE.old, BEFORE.reading), probes=PROBES[:2])
    assert two.promote  # two probes gaining alike are enough


def test_earlier_answers_that_fade_beyond_the_tolerance_are_refused():
    faded = _decide(Measurement(LEARNT, (-3.0, -3.5), BEFORE.reading), retention=1.0)  # -2 nats on average
    assert not faded.promote and faded.reason == "earlier answers faded (-2.00 nats on average)"
    assert faded.old_change == pytest.approx(-2.0)
    assert faded.retention == 0.0  # neither is recalled any more
    assert _decide(Measurement(LEARNT, (-3.0, -3.5), BEFORE.reading), retention=2.5).promote
    assert _decide(Measurement(LEARNT, (-2.0, -2.5), BEFORE.reading), retention=1.0).promote  # exactly the tolerance
    # without earlier answers there is nothing to fade
    assert _decide(Measurement(LEARNT, (), BEFORE.reading), Measurement(BEFORE.new, (), BEFORE.reading), old=[]).promote


def test_retention_counts_the_earlier_answers_recalled_before_that_still_are():
    old = OLD + [Probe("old2?", "O2.", 0, taught=-1.0)]
    before = Measurement(BEFORE.new, (-1.0, -1.5, -40.0), BEFORE.reading)  # the third was not recalled before
    verdict = _decide(Measurement(LEARNT, (-1.0, -9.0, -40.0), BEFORE.reading), before, old=old, retention=100.0)
    assert verdict.promote and verdict.retention == 0.5
    assert _decide(Measurement(LEARNT, (-1.0, -1.0, -40.0), BEFORE.reading), before, old=old).retention == 1.0


def test_an_answer_recalled_for_the_first_time_does_not_make_up_for_one_lost():
    old = OLD + [Probe("old2?", "O2.", 0, taught=-1.0)]
    before = Measurement(BEFORE.new, (-1.0, -1.5, -40.0), BEFORE.reading)
    verdict = _decide(Measurement(LEARNT, (-1.0, -9.0, -1.0), BEFORE.reading), before, old=old, retention=100.0)
    assert verdict.retention == 0.5  # one of the two recalled before is recalled still


def test_reading_is_held_against_the_bare_model_not_last_nights():
    # the live stack already read 2 nats worse than the bare model; the candidate holds that level
    worse = (-4.0, -5.0)
    verdict = _decide(Measurement(LEARNT, BEFORE.old, worse), Measurement(BEFORE.new, BEFORE.old, worse), reading=1.0)
    assert not verdict.promote and verdict.reason == "in-context reading fell (-2.00 nats against the bare model)"
    assert verdict.reading_change == pytest.approx(-2.0)
    assert (verdict.in_context_before, verdict.in_context_after) == (0.0, 0.0)  # both beyond ln 4 of the bare model
    assert _decide(Measurement(LEARNT, BEFORE.old, worse), reading=2.0).promote  # within a looser tolerance
    # a stack that reads better than the bare model may lose some of that, down to the bare model's level
    better = (-0.5, -1.0)
    assert _decide(Measurement(LEARNT, BEFORE.old, (-2.5, -3.5)), Measurement(BEFORE.new, BEFORE.old, better),
                   reading=1.0).promote


def test_kept_training_reads_the_chosen_checkpoint():
    judged = [{"steps": 120, "chosen": False}, {"steps": 240, "chosen": True}, {"steps": 360, "chosen": False}]
    assert gate.kept_training({"checkpoints": judged}) == "240 of 360 steps"
    assert gate.kept_training({"checkpoints": [{"steps": 120, "chosen": False}]}) is None
    assert gate.kept_training({}) is None
