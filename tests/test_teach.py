"""Teach: the questions a teacher writes, the answers it grounds, the probes held out, the lessons kept."""

from __future__ import annotations

import random

import pytest

from assistant.sleep import teach
from assistant.sleep.gate import Probe
from assistant.sleep.lessons import knowledge_context
from tests.fakes import Fact, FakeTrainer, render_chat

DOG = Fact("My dog is called Rex.", ("What is my dog called?", "What is my dog's name?"), "Your dog is called Rex.",
           writes=("What is my dog's name?",))
LISBON = Fact("I live in Lisbon.", ("Where do I live?",), "You live in Lisbon.")
PORTO = Fact("I moved to Porto.", ("Where do I live?",), "You live in Porto.")
CAT = Fact("My cat is Tom.", ("What is my cat called?",), "Your cat is called Tom.")
GROUNDING = 1.0


def _user(*texts: str) -> list[dict]:
    turns = []
    for text in texts:
        turns += [{"role": "user", "content": text}, {"role": "assistant", "content": "Noted."}]
    return turns


def _asked(session_id: int, said: str, *questions: str) -> list[tuple[int, list[dict], str]]:
    context = knowledge_context([{"role": "user", "content": said}])
    return [(session_id, context, question) for question in questions]


# -- parse_questions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("reply", [
    "1. What is my dog's name?\n2) Where do I live?\n(3) Who is my sister?\n4: When is the party?",  # numbered
    "- What is my dog's name?\n* Where do I live?\n\u2022 Who is my sister?\n  -  When is the party?",  # bulleted
    '1. **What is my dog\'s name?**\n- **Where do I live?**\n**Who is my sister?**\n"When is the party?"',  # bold, quotes
], ids=["numbered", "bulleted", "bold-and-quotes"])
def test_a_list_in_any_style_is_its_questions(reply):
    assert teach.parse_questions(reply) == ["What is my dog's name?", "Where do I live?", "Who is my sister?",
                                            "When is the party?"]


def test_a_number_inside_bold_or_after_a_heading_comes_off_too():
    reply = "**1. What is my dog's name?**\n### 2. Where do I live?"
    assert teach.parse_questions(reply) == ["What is my dog's name?", "Where do I live?"]


def test_plain_lines_are_questions_and_other_lines_are_not():
    reply = ("Sure! Here are some questions you could ask:\n\nWhat is my dog's name?\nWhere do I live?\n"
             "1. Tell me about my dog.\n- I hope this helps!\nIs the sky blue? Yes, it is.")
    assert teach.parse_questions(reply) == ["What is my dog's name?", "Where do I live?"]


def test_each_question_once_in_the_order_first_written():
    reply = "1. Where do I live?\n2. What is my dog's name?\n3. Where do I live?\n- What is my dog's name?"
    assert teach.parse_questions(reply) == ["Where do I live?", "What is my dog's name?"]


def test_a_full_width_question_mark_ends_a_question_too():
    reply = "1. \u6211\u4f4f\u5728\u54ea\u91cc\uff1f\n2. \u6211\u7684\u72d7\u53eb\u4ec0\u4e48\u540d\u5b57\uff1f"
    assert teach.parse_questions(reply) == ["\u6211\u4f4f\u5728\u54ea\u91cc\uff1f",
                                            "\u6211\u7684\u72d7\u53eb\u4ec0\u4e48\u540d\u5b57\uff1f"]


def test_too_short_or_too_long_lines_are_no_questions():
    long = "Why " + "very " * 50 + "long?"
    assert teach.parse_questions(f"1. ?\n2. a?\n3. {long}\n4. Why?") == ["Why?"]
    assert teach.parse_questions("") == []


# -- answer ------------------------------------------------------------------------------------------

def test_a_grounded_answer_is_kept_with_its_session_context_and_likelihoods():
    trainer = FakeTrainer([DOG])
    asked = _asked(7, DOG.said, "What is my dog called?")
    [lesson] = teach.answer(trainer, render_chat, asked, GROUNDING)
    assert (lesson.session_id, lesson.question, lesson.answer) == (7, "What is my dog called?", DOG.answer)
    assert lesson.context == tuple(asked[0][1])
    assert -0.1 < lesson.taught <= 0  # the teacher's own answer, with the session in context
    assert lesson.evidence > 10  # without the session it would say it does not know
    assert lesson.probe() == Probe("What is my dog called?", DOG.answer, 7, lesson.taught)


def test_an_answer_the_session_does_not_make_likelier_is_dropped():
    # the teacher invents the cat's name: it says the same with the session or without it
    invents = FakeTrainer([DOG], respond=lambda turns, new_block: CAT.answer
                          if turns[-1]["content"] == "What is my cat called?" else None)
    assert teach.answer(invents, render_chat, _asked(1, DOG.said, "What is my cat called?"), GROUNDING) == []
    # the model already gives the answer without the session: nothing left to learn
    knows = FakeTrainer([DOG], respond=lambda turns, new_block: DOG.answer if len(turns) == 1 else None)
    assert teach.answer(knows, render_chat, _asked(1, DOG.said, "What is my dog called?"), GROUNDING) == []
    # a question the session says nothing about: "I don't know." either way
    plain = FakeTrainer([DOG])
    assert teach.answer(plain, render_chat, _asked(1, DOG.said, "Where do I live?"), GROUNDING) == []
    # and the one grounded answer among them is still kept
    kept = teach.answer(plain, render_chat, _asked(1, DOG.said, "Where do I live?", "What is my dog called?"),
                        GROUNDING)
    assert [lesson.question for lesson in kept] == ["What is my dog called?"]


def test_an_answer_any_told_session_makes_likely_is_dropped():
    # after any session the teacher just acknowledges: likelier than with the question alone, but not
    # because of what this session says, so it is weighed against another session of the night
    acknowledges = FakeTrainer([DOG, CAT], respond=lambda turns, new_block: "Thanks for telling me."
                               if turns[-1]["content"] == "What did I tell you?" and len(turns) > 1 else None)
    asked = _asked(1, DOG.said, "What did I tell you?", "What is my dog called?") + _asked(2, CAT.said, "What did I tell you?")
    assert [(l.session_id, l.question) for l in teach.answer(acknowledges, render_chat, asked, GROUNDING)] == [
        (1, "What is my dog called?")]
    # on a night of one session there is no other to weigh against: the question alone serves
    assert len(teach.answer(acknowledges, render_chat, _asked(1, DOG.said, "What did I tell you?"), GROUNDING)) == 1


def test_each_question_is_weighed_against_the_next_window_of_another_session():
    one, two, three = ([{"role": "user", "content": text}] for text in ("a", "b", "c"))
    asked = [(1, one, "q"), (1, one, "r"), (2, two, "q"), (1, three, "q")]
    assert teach._elsewhere(asked) == [two, two, three, two]
    assert teach._elsewhere([(1, one, "q"), (1, three, "q")]) == [[], []]


def test_the_grounding_threshold_is_in_nats():
    trainer = FakeTrainer([DOG])
    [lesson] = teach.answer(trainer, render_chat, _asked(1, DOG.said, "What is my dog called?"), GROUNDING)
    asked = _asked(1, DOG.said, "What is my dog called?")
    assert teach.answer(trainer, render_chat, asked, lesson.evidence - 0.01)
    assert teach.answer(trainer, render_chat, asked, lesson.evidence + 0.01) == []


def test_an_answer_cut_at_the_length_limit_is_not_taught_half_said():
    limit = teach.ANSWER.max_tokens
    long = Fact("My address is long.", ("What is my address?",), "Your address is " + "x" * limit + ".")
    fits = Fact("My code is short.", ("What is my code?",), "C" * (limit - 2) + ".")  # one token under the limit
    assert len(fits.answer) == limit - 1
    trainer = FakeTrainer([long, fits])
    kept = teach.answer(trainer, render_chat,
                        _asked(1, f"{long.said} {fits.said}", "What is my address?", "What is my code?"), GROUNDING)
    assert [(lesson.question, lesson.answer) for lesson in kept] == [("What is my code?", fits.answer)]


def test_an_empty_answer_is_dropped_and_nothing_asked_is_nothing_answered():
    trainer = FakeTrainer([DOG], respond=lambda turns, new_block: "   ")
    assert teach.answer(trainer, render_chat, _asked(1, DOG.said, "What is my dog called?"), GROUNDING) == []
    assert teach.answer(trainer, render_chat, [], GROUNDING) == []
    assert trainer.night.calls["generate"] == 1


# -- hold_out ----------------------------------------------------------------------------------------

def _lesson(session_id: int, question: str, answer: str) -> teach.Lesson:
    return teach.Lesson(session_id, (), question, answer, -0.5, 20.0)


def _rephrased(pairs: int, lone: int) -> list[teach.Lesson]:
    """``pairs`` facts asked twice (the same answer) and ``lone`` facts asked once, in one session."""
    lessons = [_lesson(1, f"Question {i} {way}?", f"Answer {i}.") for i in range(pairs) for way in ("a", "b")]
    return lessons + [_lesson(1, f"Lone {i}?", f"Lone answer {i}.") for i in range(lone)]


@pytest.mark.parametrize("seed", range(20))
def test_probes_are_questions_another_taught_question_answers_identically(seed):
    lessons = _rephrased(pairs=5, lone=3)
    taught, probes = teach.hold_out(lessons, 0.25, random.Random(seed))
    assert len(probes) == round(len(lessons) * 0.25) == 3
    assert {p.question for p in probes}.isdisjoint(lesson.question for lesson in taught)
    assert len(taught) + len(probes) == len(lessons)
    taught_answers = {lesson.answer for lesson in taught}
    assert all(p.reference in taught_answers for p in probes)  # the fact is still taught
    assert not [p for p in probes if p.question.startswith("Lone")]  # a fact asked once stays taught
    assert [lesson for lesson in lessons if lesson in taught] == taught  # in order


def test_a_probe_carries_the_lessons_session_and_teacher_certainty():
    lessons = [_lesson(4, "Where do I live?", "You live in Lisbon."), _lesson(4, "Which city?", "You live in Lisbon.")]
    _, [probe] = teach.hold_out(lessons, 0.5, random.Random(0))
    assert probe.session_id == 4 and probe.reference == "You live in Lisbon." and probe.taught == -0.5


def test_lone_facts_are_never_held_out_whatever_the_share():
    lessons = _rephrased(pairs=0, lone=6)
    assert teach.hold_out(lessons, 0.5, random.Random(0)) == (lessons, [])
    assert teach.hold_out([], 0.5, random.Random(0)) == ([], [])


def test_a_large_share_still_leaves_one_question_per_fact_taught():
    lessons = _rephrased(pairs=3, lone=1) + [_lesson(1, "Question 0 c?", "Answer 0.")]  # fact 0 asked thrice
    taught, probes = teach.hold_out(lessons, 1.0, random.Random(3))
    assert len(probes) == 4
    assert sorted(lesson.answer for lesson in taught) == ["Answer 0.", "Answer 1.", "Answer 2.", "Lone answer 0."]


def test_only_identical_answers_of_the_same_session_are_one_fact():
    other_session = [_lesson(1, "Where do I live?", "You live in Lisbon."), _lesson(2, "Which city?", "You live in Lisbon.")]
    assert teach.hold_out(other_session, 0.5, random.Random(0))[1] == []
    other_words = [_lesson(1, "Where do I live?", "You live in Lisbon."), _lesson(1, "Which city?", "you live in lisbon")]
    assert teach.hold_out(other_words, 0.5, random.Random(0))[1] == []


def test_a_share_of_zero_holds_nothing_out():
    lessons = _rephrased(pairs=4, lone=0)
    assert teach.hold_out(lessons, 0.0, random.Random(0)) == (lessons, [])


# -- lessons_of --------------------------------------------------------------------------------------

def _lessons(trainer, sessions, lists=1, grounding=GROUNDING, seed=0):
    return teach.lessons_of(trainer, render_chat, sessions, lists=lists, grounding=grounding, rng=random.Random(seed))


def test_a_question_two_sessions_answer_keeps_the_newer_sessions_answer():
    trainer = FakeTrainer([LISBON, PORTO, DOG])
    lessons = _lessons(trainer, [(1, _user(LISBON.said, DOG.said)), (2, _user(PORTO.said))])
    found = {lesson.question: (lesson.session_id, lesson.answer) for lesson in lessons}
    assert found == {"Where do I live?": (2, PORTO.answer), "What is my dog's name?": (1, DOG.answer)}
    # oldest first is the caller's order: given the other way round, Lisbon is the newer answer
    lessons = _lessons(trainer, [(2, _user(PORTO.said)), (1, _user(LISBON.said))])
    assert [(lesson.session_id, lesson.answer) for lesson in lessons] == [(1, LISBON.answer)]


def test_questions_the_user_asked_in_the_session_are_taught_too():
    trainer = FakeTrainer([DOG])  # the teacher writes only "What is my dog's name?"
    lessons = _lessons(trainer, [(1, _user(f"{DOG.said} What is my dog called?"))])
    assert sorted(lesson.question for lesson in lessons) == ["What is my dog called?", "What is my dog's name?"]
    assert {lesson.answer for lesson in lessons} == {DOG.answer}


def test_the_teacher_reads_the_users_complete_turns_not_the_assistants_replies():
    trainer = FakeTrainer([LISBON, PORTO])
    session = [{"role": "user", "content": LISBON.said, "status": "complete"},
               {"role": "assistant", "content": PORTO.said, "status": "complete"},  # the assistant's words are no fact
               {"role": "user", "content": PORTO.said, "status": "cancelled"}]  # nor a turn that was never sent
    lessons = _lessons(trainer, [(1, session)])
    assert [(lesson.question, lesson.answer) for lesson in lessons] == [("Where do I live?", LISBON.answer)]
    assert not [prompt for prompt in trainer.night.prompts() if PORTO.said in prompt]


def test_a_session_longer_than_the_context_is_read_in_windows_and_every_fact_is_taught():
    facts = [Fact(f"My friend number {i} is called Name{i}.", (f"What is friend {i} called?",), f"Name{i}.")
             for i in range(12)]
    trainer = FakeTrainer(facts, context_length=400)  # a handful of sentences a window
    session = _user(*(fact.said for fact in facts))
    contexts = teach.session_contexts(trainer, render_chat, session)
    assert len(contexts) > 2
    lessons = _lessons(trainer, [(1, session)])
    assert sorted(lesson.answer for lesson in lessons) == sorted(fact.answer for fact in facts)
    budget = trainer.context_length - teach.ANSWER.max_tokens - teach.QUESTIONS.max_tokens
    assert all(len(trainer.encode(g.prompt)) <= budget for g in trainer.night.generated)


def test_sampled_lists_add_their_questions_once():
    trainer = FakeTrainer([DOG, LISBON])
    contexts = [knowledge_context(_user(DOG.said, LISBON.said))]
    [written] = teach.write_questions(trainer, render_chat, contexts, teach.QUESTIONS)
    assert written == ["What is my dog's name?", "Where do I live?"]
    asked = [g.prompt for g in trainer.night.generated]
    assert all(any(request in prompt for prompt in asked) for request in teach.REQUESTS)
    assert teach.write_questions(trainer, render_chat, [], teach.QUESTIONS) == []
    trainer = FakeTrainer([DOG, LISBON])
    lessons = _lessons(trainer, [(1, _user(DOG.said, LISBON.said))], lists=3)
    assert sorted(lesson.question for lesson in lessons) == ["What is my dog's name?", "Where do I live?"]
    writing = [g.sampling.temperature for g in trainer.night.generated if g.sampling.max_tokens == teach.QUESTIONS.max_tokens]
    assert writing == [0.0, 0.0, 0.8, 0.8, 0.8, 0.8]  # a greedy pass, then two sampled
    answered = [g.prompt for g in trainer.night.generated if g.sampling.max_tokens == teach.ANSWER.max_tokens]
    assert len(answered) == 2  # each question answered once, whichever passes wrote it


def test_sampled_lists_are_written_and_answered_only_while_the_clock_allows(monkeypatch):
    trainer = FakeTrainer([DOG, LISBON])
    clock = [0.0]
    monkeypatch.setattr(teach.time, "monotonic", lambda: clock[0])
    generate = trainer.generate

    def one_second_a_call(*args, **kwargs):  # a model that takes a second to decode any batch
        clock[0] += 1.0
        return generate(*args, **kwargs)

    monkeypatch.setattr(trainer, "generate", one_second_a_call)
    session = [(1, _user(DOG.said, LISBON.said))]
    # the greedy pass takes 3 s (two lists, one batch of answers): a second pass could not end by 5 s
    lessons = teach.lessons_of(trainer, render_chat, session, lists=3, grounding=GROUNDING, rng=random.Random(0),
                               until=5.0)
    assert len(lessons) == 2  # the greedy pass is written and answered whatever the clock
    assert {g.sampling.temperature for g in trainer.night.generated} == {0.0} and clock[0] == 3.0
    clock[0] = 0.0
    teach.lessons_of(trainer, render_chat, session, lists=3, grounding=GROUNDING, rng=random.Random(0), until=6.0)
    assert clock[0] == 5.0  # one sampled pass fits (two lists, nothing new in them to answer), no second


def test_nothing_new_in_a_session_is_no_lesson():
    trainer = FakeTrainer([DOG])
    assert _lessons(trainer, [(1, _user("Hello there."))]) == []
    assert _lessons(trainer, [(1, [])]) == []



# -- rephrased -----------------------------------------------------------------------------------------

def _rephrasing(mapping):
    """A fake teacher that, asked to rephrase a question, answers with ``mapping``'s rephrasing."""
    def respond(turns, new_block):
        asked = turns[-1]["content"]
        for question, other in mapping.items():
            if asked == teach.REPHRASE.format(question):
                return other
        return None
    return respond


def test_a_lone_lesson_is_probed_in_the_teachers_rephrasing_when_the_session_grounds_its_answer():
    trainer = FakeTrainer([DOG, CAT], respond=_rephrasing({"What is my dog called?": "1. What is my dog's name?",
                                                           "What is my cat called?": "What is my cat called?"}))
    [dog, cat] = teach.answer(trainer, render_chat, _asked(1, DOG.said + " " + CAT.said, "What is my dog called?",
                                                           "What is my cat called?"), GROUNDING)
    probes = teach.rephrased(trainer, render_chat, [dog, cat], [], GROUNDING)
    # the cat's "rephrasing" is the question itself: no probe of words the night trains on
    assert probes == [Probe("What is my dog's name?", DOG.answer, 1, probes[0].taught)]
    assert probes[0].taught > -1.0  # the teacher is sure of the same answer to the rephrasing
    assert teach.rephrased(trainer, render_chat, [dog], [dog.probe()], GROUNDING) == []  # already probed


def test_a_rephrasing_whose_answer_the_session_does_not_ground_is_no_probe():
    trainer = FakeTrainer([DOG], respond=_rephrasing({"What is my dog called?": "What is my cat called?"}))
    [dog] = teach.answer(trainer, render_chat, _asked(1, DOG.said, "What is my dog called?"), GROUNDING)
    assert teach.rephrased(trainer, render_chat, [dog], [], GROUNDING) == []


# -- rows and recitals -------------------------------------------------------------------------------

def test_each_window_of_tonights_sessions_is_recited_in_the_users_own_words():
    trainer = FakeTrainer([DOG, LISBON])
    sessions = [(1, _user(DOG.said, LISBON.said)), (2, _user(CAT.said))]  # session 2: nothing the teacher asked
    lesson = teach.Lesson(1, tuple(knowledge_context(sessions[0][1])), "Where do I live?", LISBON.answer, -0.5, 20.0)
    rows = teach.rows(trainer, render_chat, sessions, [lesson], [])
    recited = [row for row in rows if row.question == teach.RECITE]
    assert [(row.session_id, row.answer) for row in recited] == (
        [(1, f"{DOG.said}\n{LISBON.said}")] * teach.RECITALS + [(2, CAT.said)] * teach.RECITALS)
    for row in recited:  # the user's words only, read by the teacher from its context, said by the student
        assert row.kind == "new" and row.answer in row.teacher_prompt and row.answer not in row.student_prompt
        assert row.student_prompt == render_chat([{"role": "user", "content": teach.RECITE}])
    assert len(rows) == 1 + len(recited)


def test_a_long_window_is_recited_in_pieces_of_whole_sentences_that_fit():
    said = " ".join(f"My friend number {i} is called Name{i}." for i in range(12))
    trainer = FakeTrainer([])
    pieces = teach.pieces(trainer, said, limit=100)
    assert len(pieces) > 2 and " ".join(pieces) == said
    assert all(len(trainer.encode(p)) <= 100 for p in pieces)
    assert all(p.endswith(".") for p in pieces)  # cut between sentences, never inside one
    assert teach.pieces(trainer, "x" * 250, limit=100) == ["x" * 100, "x" * 100, "x" * 50]  # nothing lost
    assert teach.pieces(trainer, "I moved.\nMy dog is Rex.  \n") == ["I moved.\nMy dog is Rex."]  # as written


def test_replayed_answers_are_rows_of_their_own_and_never_recited():
    probe = Probe("Where do I live?", "You live in Lisbon.", 3, -0.4)
    [row] = teach.rows(FakeTrainer([]), render_chat, [], [], [probe])
    assert row.kind == "replay" and row.teacher_prompt == row.student_prompt and row.answer == probe.reference
