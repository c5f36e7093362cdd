"""A newer fact supersedes an older one: which earlier questions tonight's sessions answer anew."""

from __future__ import annotations

import pytest

from assistant.models import NANO_DIR
from assistant.sleep import lessons, supersede


def test_topic_words_leave_out_what_makes_it_a_question():
    assert supersede.topic_words("Where does my sister's dog live?") == {"sister", "dog", "live"}
    assert supersede.topic_words("What is my sister's name?") == {"sister"}


def test_only_sessions_with_a_sentence_about_the_whole_topic_are_asked():
    sessions = ["My dog is called Rex.", "I moved to Lyon, I live there now.", "My sister is called Mia. I live in Oslo."]
    assert supersede.related("Where do I live?", sessions) == [1, 2]
    assert supersede.related("What is my dog called?", sessions) == [0]
    assert supersede.related("What is my sister's name?", sessions) == [2]
    assert supersede.related("Where does my sister live?", sessions) == []  # no one sentence says both
    assert supersede.related("What is it?", sessions) == []  # nothing but question words


@pytest.mark.slow
@pytest.mark.skipif(not (NANO_DIR / "model.safetensors").is_file(), reason="nano model not built")
def test_a_session_that_tells_a_new_value_supersedes_the_old_answer_and_a_repeat_does_not():
    from backends.select import open_trainer

    trainer = open_trainer("torch", NANO_DIR)
    try:
        def lesson(text):
            return lessons.Lesson(1, lessons.knowledge_context([{"role": "user", "content": text}]))

        known = [("Where do I live?", "You live in Porto."), ("What is my sister called?", "Your sister is called Zara.")]
        assert supersede.superseded(trainer, known, [lesson("I live in Lyon. My dog is called Rex.")]) == {
            "Where do I live?"}
        assert supersede.superseded(trainer, known, [lesson("I live in Porto. My sister is called Zara.")]) == set()
        assert supersede.superseded(trainer, known, [lesson("My dog is called Rex.")]) == set()
        assert supersede.superseded(trainer, known, [lesson("My sister is called Mia.")]) == {
            "What is my sister called?"}
    finally:
        trainer.close()
