"""Which of the earlier nights' questions tonight's sessions answer differently: a newer fact wins.

Last week the user said "I live in Porto"; today, "I moved to Lyon". Last week's block answers
"Where do I live?" with Porto, while tonight's teacher, reading today's session, answers Lyon.
Replaying last week's answer would fight tonight's, and the gate would count Porto's fading as
forgetting and reject the very night that brought the news. So before training, every earlier
question is put to the teacher with each of tonight's sessions that has a sentence about all of its
topic words ("sister" for "What is my sister called?"; a looser match let the small model answer
about a sister from a sentence about a dog).
Where a session grounds a different answer (the teacher is sure of it and the session is what makes
it sure, the test ``dreams`` applies to its references), the question is superseded: it leaves
replay and the gate's retention probes for good. A session that says the same again supersedes
nothing, and neither does one the teacher cannot answer from.
"""

from __future__ import annotations

from collections.abc import Sequence

from assistant.sleep import counterfactual, lessons
from assistant.sleep.dreams import newest_grounded, teacher_answers
from assistant.sleep.lessons import user_turn
from assistant.sleep.rewards import normalise_answer
from backends.base import BlockTrainer

CONFIDENCE = 0.5  # as dreams judge a reference: the teacher's least mean token probability
GROUNDING = 2.0  # and how many times likelier the session must make the answer than no session
# Words that say what kind of question it is, not what it is about.
_FUNCTION_WORDS = frozenset("""
    a about am an and any are at be call called can could did do does for from had has have how i in
    is it its me my name named now of on or our please tell that the their them there these they
    this those to was we were what when where which who whom whose why will with would you your
""".split())


def topic_words(text: str) -> set[str]:
    """The words of ``text`` that carry its topic, lower-cased, possessives folded ("sister's")."""
    return set(map(counterfactual.folded, counterfactual.words(text))) - _FUNCTION_WORDS


def related(question: str, sessions: Sequence[str]) -> list[int]:
    """Indexes of the ``sessions`` (the user's words) with a sentence about every topic word of
    ``question`` (none for a question with no topic word)."""
    asked = topic_words(lessons.unframed(question))
    if not asked:
        return []
    return [index for index, said in enumerate(sessions)
            if any(asked <= topic_words(sentence) for sentence in lessons.sentences(said))]


def superseded(trainer: BlockTrainer, known: Sequence[tuple[str, str]], tonight: Sequence[lessons.Lesson]) -> set[str]:
    """The questions of ``known`` (question, the answer an earlier night learnt) that one of
    ``tonight``'s sessions answers differently, by the pre-sleep model as teacher."""
    said = [lessons.said(lesson.context) for lesson in tonight]
    pairs = [(question, answer, tonight[index]) for question, answer in dict(known).items()
             for index in related(question, said)]
    if not pairs:
        return set()
    prompts = [trainer.render_chat(lesson.context + user_turn(question)) for question, _, lesson in pairs]
    bare = [trainer.encode(trainer.render_chat(user_turn(question))) for question, _, _ in pairs]
    answers, sure, unaided = teacher_answers(trainer, prompts, bare)
    found: set[str] = set()
    for (question, learnt, _), answer, with_session, without in zip(pairs, answers, sure, unaided):
        grounded = newest_grounded([with_session], [without], CONFIDENCE, GROUNDING) is not None
        if answer and grounded and normalise_answer(answer) != normalise_answer(learnt):
            found.add(question)
    return found

