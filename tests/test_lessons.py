"""What a night learns from: the teacher's context, windows, and the prompts (pure functions)."""

import random

from assistant.sleep import lessons


def test_the_teacher_hears_the_user_not_the_assistant():
    session = [
        {"role": "user", "content": "My dog is called Rex."},
        {"role": "assistant", "content": "Your dog is called Max."},  # wrong, and corrected next
        {"role": "user", "content": "No, that's wrong. My dog is called Rex."},
    ]
    context = lessons.knowledge_context(session)
    assert [m["role"] for m in context] == ["user", "assistant"]
    assert "Max" not in context[0]["content"]
    assert context[0]["content"] == "My dog is called Rex.\nNo, that's wrong. My dog is called Rex."
    assert context[1]["content"] == lessons.ACKNOWLEDGEMENT


def test_a_long_session_is_split_into_overlapping_windows_that_cover_every_turn():
    turns = [{"role": "user", "content": f"fact number {i}"} for i in range(10)]
    fits = lambda context: context[0]["content"].count("\n") < 4  # at most four turns per window
    windows = lessons.windows(turns, fits, overlap=2)
    assert len(windows) > 1
    assert all(fits(lessons.knowledge_context(w)) for w in windows)
    covered = [t["content"] for w in windows for t in w]
    assert set(covered) == {t["content"] for t in turns}
    for first, second in zip(windows, windows[1:]):
        assert first[-2:] == second[:2]  # consecutive windows share two turns


def test_a_session_that_fits_is_one_window_and_an_empty_one_none():
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert lessons.windows(turns, lambda c: True) == [[turns[0]]]
    assert lessons.windows([], lambda c: True) == []


def test_written_questions_are_parsed_from_a_numbered_list():
    reply = "1. What is my dog's name?\n2) Where do I live?\nsome chatter\n3. What is my dog's name?\n4. not a question"
    assert lessons.parse_questions(reply) == ["What is my dog's name?", "Where do I live?"]


def test_questions_the_user_asked_become_prompts():
    messages = [
        {"role": "user", "content": "John moved to the hallway. Where is John?"},
        {"role": "assistant", "content": "John is in the hallway. Anything else?"},
        {"role": "user", "content": "Thanks.\nWhere is Mary?"},
    ]
    assert lessons.asked_questions(messages) == ["Where is John?", "Where is Mary?"]


def test_each_told_sentence_is_a_context_of_its_own_to_write_questions_about():
    messages = [
        {"role": "user", "content": "My dog is Rex. I live in Oslo.\nWhere is John?"},
        {"role": "assistant", "content": "Rex is a fine name."},
        {"role": "user", "content": "I live in Oslo. My sister is Mia!"},
    ]
    told = [lessons.said(context) for context in lessons.statement_contexts(messages)]
    assert told == ["My dog is Rex.", "I live in Oslo.", "My sister is Mia!"]  # no question, no reply, once each
    assert all(context[-1]["role"] == "assistant" for context in lessons.statement_contexts(messages))


def test_probes_are_rephrasings_of_what_training_still_teaches():
    answers = {f"q{i}?": f"Answer {i // 2}." for i in range(10)}  # five answers, two questions each
    answers["lone?"] = "Only here."
    held, lone = lessons.hold_out(answers, 0.3, random.Random(0))
    assert len(held) == 3 and "lone?" not in held and lone == []
    taught = {answers[q] for q in answers if q not in held}
    assert taught == set(answers.values())  # every answer keeps a question in training


def test_answers_that_differ_only_in_case_and_punctuation_are_one_fact():
    answers = {"a?": "Your dog is called Rex.", "b?": "your dog is called rex", "c?": "You live in Oslo."}
    held, lone = lessons.hold_out(answers, 0.3, random.Random(0))
    assert held in ({"a?"}, {"b?"}) and lone == []


def test_without_rephrasings_lone_questions_fill_the_share_and_stay_in_training():
    answers = {f"Where is {name}?": f"{name} is in the {room}." for name, room in
               [("John", "hallway"), ("Mary", "garden"), ("Sandra", "office"), ("Daniel", "kitchen"), ("Eve", "bath")]}
    held, lone = lessons.hold_out(answers, 0.3, random.Random(0))
    assert held == set() and len(lone) == 2 and set(lone) <= set(answers)
    mixed = {"a?": "One.", "b?": "one", "c?": "Two.", "d?": "Three.", "e?": "Four."}
    held, lone = lessons.hold_out(mixed, 0.4, random.Random(0))  # two wanted, one rephrasing
    assert len(held) == 1 and held <= {"a?", "b?"} and len(lone) == 1 and lone[0] in {"c?", "d?", "e?"}
    assert lessons.hold_out({"a?": "One."}, 0.3, random.Random(0)) == (set(), ["a?"])
    assert lessons.hold_out({}, 0.3, random.Random(0)) == (set(), [])


def test_a_framed_question_keeps_its_words_after_a_lead_in():
    assert lessons.framed("Where do I live?", "Hey, {}") == "Hey, where do I live?"
    assert lessons.framed("Where do I live?", "I forgot. {}") == "I forgot. Where do I live?"
    assert lessons.framed("I wonder, what is it?", "Tell me, {}") == "Tell me, I wonder, what is it?"


def test_no_framing_is_a_phrasing_the_bench_holds_out():
    """The bench asks in phrasings the model never writes; a framing that began one would teach the
    probe's own words and flatter recall."""
    from assistant.nano.world import World

    world = World(7, heldout=True)
    heldout = {question.lower() for _ in range(300) for question in world.fact().heldout_questions}
    leads = {framing.format("").strip(" ,:.").lower() for framing in lessons.FRAMINGS}
    assert len(heldout) > 100 and leads
    assert not [question for question in heldout for lead in leads if question.startswith(lead)]


def _heard(text: str) -> list[dict]:
    return lessons.knowledge_context([{"role": "user", "content": text}])


def test_an_answer_is_taught_only_if_the_user_said_its_value_of_whom_the_question_asks():
    told = _heard("Alexander works as a sailor. The instrument I like most is harp. My pony is called Rocky.")
    assert lessons.told("What is Alexander's job?", "Alexander works as a sailor.", told)
    assert lessons.told("What is the name of my pony?", "Your pony is called Rocky.", told)
    assert not lessons.told("What is my job?", "You work as a sailor.", told)  # Alexander's, not the user's
    assert not lessons.told("What is Mei's job?", "Mei works as a sailor.", told)  # nobody told of Mei
    assert not lessons.told("Which city do I live in?", "You live in Stockholm.", told)  # said nowhere
    locker = _heard("My locker number is 42.")
    assert lessons.told("What is my locker number?", "Your locker number is 42.", locker)  # a number is a value
    assert not lessons.told("What is my locker number?", "Your locker number is 17.", locker)


def test_the_most_specific_word_finds_the_sentence_and_a_common_one_does_not():
    story = _heard("Mary moved to the bathroom.\nJohn went to the hallway.\nMary travelled to the kitchen.")
    assert lessons.told("Where is Mary?", "Mary is in the kitchen.", story)
    assert lessons.told("Where is John?", "John is in the hallway.", story)
    # "the" is in John's sentence too, but the kitchen is only where Mary went
    assert not lessons.told("Where is John?", "John is in the kitchen.", story)
    visit = _heard("Eric works as a gardener. I'm seeing the lawyer on Sunday at 4 pm.")
    assert lessons.told("When is my lawyer appointment?", "Your lawyer appointment is on Sunday at 4 pm.", visit)
    assert lessons.told("When is the appointment?", "The appointment is on Sunday at 4 pm.", visit)  # about no one


def test_a_lead_in_comes_off_again_and_a_plain_question_stays_as_it_is():
    for framing in lessons.FRAMINGS:
        assert lessons.unframed(lessons.framed("Where do I live?", framing)).lower() == "where do i live?"
    assert lessons.unframed("Hey Jude, where do I live?") == "Hey Jude, where do I live?"
