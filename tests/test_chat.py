"""The chat engine with the real tiny model: prompts that fit, streaming, recording, cancelling."""

from __future__ import annotations

import threading

import pytest

from assistant.chat import Chat, ChatError, ContextOverflowError
from assistant.config import Config, open_paths
from assistant.engine import open_chat_backend
from assistant.store import Store, StoreError
from backends.base import Sampling
from backends.select import is_installed

SHORT = Sampling(max_tokens=8)


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from backends.select import open_backend

    engine = open_backend("torch", hf_dir=tiny_model_dir)
    yield engine
    engine.close()


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "somnus.db") as opened:
        yield opened


def tokens_of(backend, turns) -> int:
    return backend.count_tokens(backend.render_chat(turns, add_generation_prompt=True))


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_a_turn_is_streamed_and_recorded_with_its_counts(backend, store):
    chat = Chat(backend, model="tiny", store=store, sampling=SHORT)
    pieces: list[str] = []
    reply = chat.reply("Hello! How are you?", on_piece=pieces.append)
    assert reply.status == "complete" and reply.text == "".join(pieces) and reply.text
    assert reply.prompt_tokens == tokens_of(backend, [user("Hello! How are you?")])
    assert reply.completion_tokens == backend.count_tokens(reply.text)
    said, answered = store.messages(chat.session_id)
    assert (said["role"], said["content"], said["status"]) == ("user", "Hello! How are you?", "complete")
    assert (answered["role"], answered["content"], answered["status"]) == ("assistant", reply.text, "complete")
    assert (answered["model"], answered["prompt_tokens"], answered["completion_tokens"]) == (
        "tiny", reply.prompt_tokens, reply.completion_tokens)
    assert answered["id"] == reply.message_id and store.session(chat.session_id)["model"] == "tiny"


def test_the_users_turn_is_stored_before_the_reply_starts(backend, store):
    chat = Chat(backend, model="tiny", store=store, sampling=SHORT)
    seen_while_streaming: list[list[str]] = []
    chat.reply("Remember: my dog is Rex.",
               on_piece=lambda piece: seen_while_streaming.append([m["role"] for m in store.messages(chat.session_id)]))
    assert seen_while_streaming and all(roles == ["user"] for roles in seen_while_streaming)


def test_the_conversation_continues_in_the_same_session(backend, store):
    chat = Chat(backend, model="tiny", store=store, sampling=SHORT)
    first = chat.reply("My sister is Alice.")
    second = chat.reply("Where does she live?")
    assert second.session_id == first.session_id
    expected = [user("My sister is Alice."), assistant(first.text), user("Where does she live?")]
    assert second.prompt_tokens == tokens_of(backend, expected)
    resumed = Chat(backend, model="tiny", store=store, session_id=first.session_id, sampling=SHORT)
    third = resumed.reply("Thanks!")
    assert third.prompt_tokens == tokens_of(backend, expected + [assistant(second.text), user("Thanks!")])


def test_only_the_most_recent_turns_that_fit_are_sent(backend, store):
    session_id = store.create_session(model="tiny")
    history = []
    for index in range(30):
        turn = (user if index % 2 == 0 else assistant)(f"Turn {index}: Mary journeyed to the bathroom and back.")
        store.add_message(session_id, turn["role"], turn["content"])
        history.append(turn)
    history.append(user("Where is Mary?"))
    budget = backend.context_length - SHORT.max_tokens
    expected = next(tokens_of(backend, history[start:]) for start in range(len(history))
                    if history[start]["role"] == "user" and tokens_of(backend, history[start:]) <= budget)
    assert tokens_of(backend, history) > budget  # the whole session would not fit

    reply = Chat(backend, model="tiny", store=store, session_id=session_id, sampling=SHORT).reply("Where is Mary?")
    assert reply.prompt_tokens == expected and reply.status == "complete"


def test_a_message_too_long_for_the_context_is_kept_but_not_answered(backend, store):
    chat = Chat(backend, model="tiny", store=store, sampling=SHORT)
    chat.reply("Hello!")
    too_long = "Daniel went back to the kitchen. " * 200
    with pytest.raises(ContextOverflowError, match="too long for the model") as caught:
        chat.reply(too_long)
    assert "it was recorded" in str(caught.value) and "\n" not in str(caught.value)
    assert [m["role"] for m in store.messages(chat.session_id)] == ["user", "assistant", "user"]
    assert store.messages(chat.session_id)[-1]["content"] == too_long
    follow_up = chat.reply("Sorry, short now.")
    assert follow_up.status == "complete"  # the long turn falls out of the window, the chat goes on


def test_a_reply_budget_as_large_as_the_context_is_refused(backend, store):
    chat = Chat(backend, model="tiny", store=store, sampling=Sampling(max_tokens=backend.context_length))
    with pytest.raises(ChatError, match="lower max_tokens"):
        chat.reply("Hello")


def test_an_empty_message_is_refused_and_nothing_is_stored(backend, store):
    chat = Chat(backend, model="tiny", store=store, sampling=SHORT)
    with pytest.raises(ChatError, match="empty"):
        chat.reply("  \n ")
    assert store.counts() == {"sessions": 0, "messages": 0}


def test_cancelling_keeps_the_users_turn_and_the_partial_reply(backend, store):
    chat = Chat(backend, model="tiny", store=store, sampling=Sampling(max_tokens=60))
    cancel = threading.Event()
    pieces: list[str] = []

    def on_piece(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()

    reply = chat.reply("Tell me a long story.", on_piece=on_piece, cancel=cancel)
    assert reply.status == "cancelled" and reply.text == "".join(pieces) and len(pieces) == 3
    said, partial = store.messages(chat.session_id)
    assert said["content"] == "Tell me a long story."
    assert (partial["status"], partial["content"]) == ("cancelled", reply.text)
    after = chat.reply("Never mind.")
    assert after.prompt_tokens == tokens_of(backend, [user("Tell me a long story."), user("Never mind.")])


def test_a_worker_thread_reply_is_cancelled_from_another_thread(backend, store):
    chat = Chat(backend, model="tiny", store=store, sampling=Sampling(max_tokens=400))
    cancel, started = threading.Event(), threading.Event()
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(
        reply=chat.reply("Go on and on.", on_piece=lambda piece: started.set(), cancel=cancel)))
    worker.start()
    assert started.wait(60)
    cancel.set()
    worker.join(60)
    assert outcome["reply"].status == "cancelled"
    assert store.messages(chat.session_id)[-1]["status"] == "cancelled"


def test_ctrl_c_while_streaming_records_a_cancelled_reply(backend, store):
    chat = Chat(backend, model="tiny", store=store, sampling=Sampling(max_tokens=30))

    def interrupt(piece: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        chat.reply("Hello", on_piece=interrupt)
    assert [(m["role"], m["status"]) for m in store.messages(chat.session_id)] == [
        ("user", "complete"), ("assistant", "cancelled")]


def test_a_failure_while_streaming_records_the_reply_as_an_error(backend, store):
    chat = Chat(backend, model="tiny", store=store, sampling=Sampling(max_tokens=30))
    shown: list[str] = []

    def reader_went_away(piece: str) -> None:
        shown.append(piece)
        if len(shown) == 2:
            raise BrokenPipeError("stdout closed")

    with pytest.raises(BrokenPipeError):
        chat.reply("Hello", on_piece=reader_went_away)
    answered = store.messages(chat.session_id)[-1]
    assert (answered["status"], answered["content"]) == ("error", "".join(shown))


def test_a_store_that_is_busy_stops_the_turn_before_any_generation(backend, tmp_path):
    import sqlite3

    with Store(tmp_path / "somnus.db", busy_timeout=0.2) as store:
        session_id = store.create_session()
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        pieces: list[str] = []
        chat = Chat(backend, model="tiny", store=store, session_id=session_id, sampling=SHORT)
        with pytest.raises(StoreError, match="busy"):
            chat.reply("Hello", on_piece=pieces.append)
        other.execute("ROLLBACK")
        other.close()
        assert pieces == [] and store.messages(session_id) == []


def test_a_private_chat_records_nothing_but_remembers_its_own_turns(backend, store):
    chat = Chat(backend, model="tiny", store=store, sampling=SHORT, private=True)
    first = chat.reply("A secret: my PIN is 1234.")
    second = chat.reply("What did I say?")
    assert first.session_id is None and first.message_id is None and second.session_id is None
    assert second.prompt_tokens == tokens_of(
        backend, [user("A secret: my PIN is 1234."), assistant(first.text), user("What did I say?")])
    assert store.counts() == {"sessions": 0, "messages": 0}
    assert Chat(backend, model="tiny", sampling=SHORT, private=True).reply("No store at all").status == "complete"


def test_a_private_turn_in_a_recorded_session_sees_it_but_adds_nothing(backend, store):
    recorded = Chat(backend, model="tiny", store=store, sampling=SHORT)
    recorded.reply("My cat is Tom.")
    before = store.messages(recorded.session_id)
    private = Chat(backend, model="tiny", store=store, session_id=recorded.session_id, sampling=SHORT, private=True)
    reply = private.reply("Off the record.")
    assert reply.prompt_tokens == tokens_of(
        backend, [user("My cat is Tom."), assistant(before[1]["content"]), user("Off the record.")])
    assert store.messages(recorded.session_id) == before


def test_an_unknown_session_is_refused_at_once(backend, store):
    with pytest.raises(StoreError, match="no session 7"):
        Chat(backend, model="tiny", store=store, session_id=7)


@pytest.mark.skipif(not is_installed("llamacpp"), reason="llama-cpp-python is not installed")
def test_the_llamacpp_engine_chats_and_records_too(tiny_model_dir, somnus_home, store):
    paths = open_paths()
    engine, model = open_chat_backend(Config(model=str(tiny_model_dir), backend="llamacpp"), paths)
    try:
        chat = Chat(engine, model=model.ref, store=store, sampling=SHORT)
        pieces: list[str] = []
        reply = chat.reply("Hello! How can I help you today?", on_piece=pieces.append)
    finally:
        engine.close()
    assert reply.status == "complete" and reply.text == "".join(pieces)
    assert store.messages(chat.session_id)[-1]["content"] == reply.text


def test_the_system_prompt_goes_before_every_prompt_and_is_never_recorded(backend, store):
    system = "You are the user's assistant."
    chat = Chat(backend, model="tiny", store=store, sampling=SHORT, system=system)
    reply = chat.reply("Hello!")
    assert reply.prompt_tokens == tokens_of(backend, [{"role": "system", "content": system}, user("Hello!")])
    assert reply.prompt_tokens > tokens_of(backend, [user("Hello!")])
    assert [m["role"] for m in store.messages(chat.session_id)] == ["user", "assistant"]


def test_a_reply_in_flight_is_marked_and_the_mark_goes_when_it_ends(backend, store, tmp_path):
    from assistant.crashes import ReplyJournal

    journal = ReplyJournal(tmp_path / "replying")
    seen = []
    chat = Chat(backend, model="tiny", store=store, sampling=SHORT, journal=journal)
    chat.reply("Hello!", on_piece=lambda piece: seen.append(list(journal.folder.iterdir())))
    assert seen and all(len(marks) == 1 for marks in seen)
    assert list(journal.folder.iterdir()) == [] and journal.crashed() == []


def test_the_system_prompt_gives_way_to_a_message_that_would_not_fit_beside_it(backend, store):
    budget = backend.context_length - SHORT.max_tokens
    system = "You are the user's assistant. " * budget  # alone longer than the whole budget
    chat = Chat(backend, model="tiny", store=store, sampling=SHORT, system=system)
    assert chat.reply("Hello!").prompt_tokens == tokens_of(backend, [user("Hello!")])
