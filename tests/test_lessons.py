"""What a night learns from: the teacher's context, windows, and the prompts (pure functions)."""

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


def test_a_users_words_are_cut_into_sentences_and_a_question_put_as_one_user_turn():
    text = "My dog is Rex. I live in Oslo!\nWhere is John?   Thanks.\n\n"
    assert lessons.sentences(text) == ["My dog is Rex.", "I live in Oslo!", "Where is John?", "Thanks."]
    assert lessons.sentences("") == []
    assert lessons.user_turn("Where do I live?") == [{"role": "user", "content": "Where do I live?"}]
