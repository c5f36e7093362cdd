"""The world generator: seeded, honest about the latest state, and without shortcuts to learn."""

from __future__ import annotations

import re

from assistant.nano import pools
from assistant.nano.world import World

MOVE = re.compile(r"(\w+) (?:moved|went|went back|journeyed|travelled|walked|ran) to the (\w+)\.")
LEFT = re.compile(r"(\w+) left the (\w+) in the (\w+)\.")


def replay(text: str, where: dict[str, str]) -> str:
    """Apply a user turn's story lines to ``where``; return the room mentioned last."""
    last = ""
    for sentence in re.split(r"(?<=[.?])\s+", text):
        if match := MOVE.fullmatch(sentence):
            where[match[1]] = last = match[2]
        elif match := LEFT.fullmatch(sentence):
            where[f"the {match[2]}"] = last = match[3]
    return last


def story_questions(seed: int, count: int, heldout: bool = True):
    """(answer, latest place of the subject by replaying the story, room mentioned last) per question."""
    return story_questions_of(World(seed, heldout=heldout), count)


def story_questions_of(world: World, count: int):
    for _ in range(count):
        session = world.story_session()
        where: dict[str, str] = {}
        last = ""
        for index, message in enumerate(session.messages):
            if message["role"] == "user":
                last = replay(message["content"], where) or last
            for probe in (p for p in session.probes if p.at == index):
                subject = probe.question.removeprefix("Where is ").rstrip("?")
                yield probe.value, where[subject], last


def test_a_seed_makes_the_same_sessions():
    assert [World(3).session().messages for _ in range(5)] == [World(3).session().messages for _ in range(5)]
    assert World(3).session().messages != World(4).session().messages


def test_every_story_question_is_answered_by_the_askeds_latest_move():
    rows = list(story_questions(11, 300))
    assert len(rows) > 900
    assert all(answer == latest for answer, latest, _ in rows)


def test_the_room_mentioned_last_is_not_a_shortcut():
    rows = list(story_questions(12, 400))
    last_share = sum(answer == last for answer, _, last in rows) / len(rows)
    assert 0.2 < last_share < 0.45  # bAbI qa1 itself: 0.53


def test_held_out_sessions_draw_names_from_the_held_out_pools_only():
    trained = set(pools.split(pools.FIRST_NAMES)[0])
    held_out = set(pools.split(pools.FIRST_NAMES)[1])
    world = World(5, heldout=True)
    names = {world.name() for _ in range(300)}
    assert names <= held_out and not names & trained


def test_a_wrong_answer_the_user_corrected_is_never_a_target():
    world = World(21)
    sessions = [world.facts_session() for _ in range(400)]
    corrected = [s for s in sessions if any(not m["train"] for m in s.messages)]
    assert corrected
    for session in corrected:
        wrong = next(i for i, m in enumerate(session.messages) if not m["train"])
        assert session.messages[wrong]["role"] == "assistant"
        assert session.messages[wrong + 1]["content"].startswith("No, that's wrong.")


def test_invented_words_spelt_from_pieces_use_only_the_pieces():
    pieces = ("ase", "ment", "ol")
    world = World(8, invented_share=1.0, pieces=pieces)
    values = {world.invented(["cellar"]) for _ in range(600)}
    spelt = {v for v in values if re.fullmatch(r"(?:ase|ment|ol){2,3}", v)}
    assert len(spelt) > 20  # about a third of invented words, in 2-3 pieces
    assert World(8, invented_share=1.0).invented(["cellar"]) == World(8, invented_share=1.0, pieces=()).invented(["cellar"])


def revisited_share(world: World, count: int) -> float:
    """Share of story questions about someone who has moved more than once by then."""
    asked = again = 0
    for _ in range(count):
        session = world.story_session()
        moves: dict[str, int] = {}
        for index, message in enumerate(session.messages):
            if message["role"] == "user":
                for who in MOVE.findall(message["content"]):
                    moves[who[0]] = moves.get(who[0], 0) + 1
            for probe in (p for p in session.probes if p.at == index):
                asked += 1
                again += moves.get(probe.question.removeprefix("Where is ").rstrip("?"), 0) > 1
    return again / asked


def test_revisit_asks_more_often_about_people_who_moved_again_and_keeps_the_last_room_no_shortcut():
    plain, revisiting = revisited_share(World(13), 300), revisited_share(World(13, revisit=0.6), 300)
    assert revisiting > plain + 0.05  # bAbI qa1 asks about someone who moved twice or more 67% of the time
    rows = list(story_questions_of(World(12, revisit=0.6), 400))
    assert all(answer == latest for answer, latest, _ in rows)
    assert 0.2 < sum(answer == last for answer, _, last in rows) / len(rows) < 0.45
