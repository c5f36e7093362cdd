"""Newer wins: which earlier answers tonight's sessions contradict, read by likelihood."""

from __future__ import annotations

from assistant.sleep import supersede
from assistant.sleep.gate import Probe
from tests.fakes import Fact, FakeTrainer, render_chat

LISBON = Fact("I live in Lisbon.", ("Where do I live?",), "You live in Lisbon.")
PORTO = Fact("I moved to Porto.", ("Where do I live?",), "You live in Porto.")
DOG = Fact("My dog is called Rex.", ("What is my dog called?",), "Your dog is called Rex.")
THRESHOLD = 1.0

EARLIER = [Probe("Where do I live?", LISBON.answer, 1), Probe("What is my dog called?", DOG.answer, 1)]
THEN = {1: f"{LISBON.said} {DOG.said}"}


def _superseded(earlier=EARLIER, then=THEN, tonight=((2, PORTO.said),), threshold=THRESHOLD, **options):
    trainer = FakeTrainer([LISBON, PORTO, DOG], **options)
    return supersede.superseded(trainer, render_chat, earlier, then, list(tonight), threshold)


def test_an_earlier_answer_tonights_session_contradicts_is_superseded_and_the_rest_stays():
    assert _superseded() == {"Where do I live?"}


def test_tonights_words_are_read_after_the_earlier_sessions():
    """The fake answers from the sentence said last: read in the other order, Lisbon would still win."""
    assert _superseded(earlier=EARLIER[:1]) == {"Where do I live?"}
    assert _superseded(tonight=[(2, PORTO.said), (3, "Hello there.")]) == {"Where do I live?"}


def test_a_session_that_says_nothing_new_supersedes_nothing():
    assert _superseded(tonight=[(2, "My sister likes tea.")]) == set()
    assert _superseded(tonight=[(2, LISBON.said)]) == set()  # said again, not contradicted
    assert _superseded(tonight=[]) == set()


def test_an_answer_whose_session_is_unknown_is_left_alone():
    unknown = [Probe("Where do I live?", LISBON.answer, 5), Probe("Where do I live?", LISBON.answer, None)]
    assert _superseded(earlier=unknown) == set()
    assert _superseded(then={}) == set()
    assert _superseded(earlier=[]) == set()


def test_only_a_change_of_at_least_the_threshold_supersedes():
    assert _superseded(threshold=1e6) == set()


def test_a_context_too_long_for_the_model_is_not_read():
    assert _superseded(context_length=120) == set()


def test_the_earlier_answer_is_read_against_each_of_tonights_sessions():
    earlier = [Probe("Where do I live?", LISBON.answer, 1), Probe("Where do I live?", PORTO.answer, 3)]
    then = {1: LISBON.said, 3: PORTO.said}
    # tonight's session 3 is the Porto one itself: it cannot contradict its own answer, but it contradicts Lisbon
    assert _superseded(earlier=earlier[:1], then=then, tonight=[(3, PORTO.said)]) == {"Where do I live?"}
    assert _superseded(earlier=earlier[1:], then=then, tonight=[(3, PORTO.said)]) == set()
    assert _superseded(earlier=earlier[1:], then=then, tonight=[(3, PORTO.said), (4, LISBON.said)]) == {
        "Where do I live?"}


def test_a_session_is_never_read_against_itself():
    assert _superseded(earlier=EARLIER[:1], then={1: LISBON.said}, tonight=[(1, PORTO.said)]) == set()


class _Bounded(FakeTrainer):
    """A fake that, like a real engine, cannot score a prompt and answer longer than its context."""

    def completion_logits(self, prefixes, completions, *, new_block):
        assert all(len(p) + len(c) <= self.context_length for p, c in zip(prefixes, completions)), "over-long input"
        return super().completion_logits(prefixes, completions, new_block=new_block)


def test_an_earlier_session_too_long_to_read_is_left_alone():
    trainer = _Bounded([LISBON, PORTO, DOG], context_length=300)
    earlier = [Probe("What is my dog called?", DOG.answer, 1), Probe("Where do I live?", LISBON.answer, 2)]
    then = {1: DOG.said + " And so on." * 40, 2: LISBON.said}
    assert supersede.superseded(trainer, render_chat, earlier, then, [(3, PORTO.said)], THRESHOLD) == {
        "Where do I live?"}
