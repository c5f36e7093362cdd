"""A seeded world of synthetic chat "days": what a user tells an assistant, and what they ask back.

Three kinds of session: personal facts (people, pets, places, jobs, dates, favourites, appointments),
bAbI-style stories (people moving between rooms; the answer is the latest state), and small talk.
Facts come in many phrasings; the questions used for evaluation are held-out paraphrases, and the
entities of evaluation sessions come from the held-out half of every pool, so a model can only
answer them by copying from its context (or, after a sleep, from its adapter).

Sessions also exercise the two skills the sleep cycle asks of a model: writing questions about a
conversation, and restating what it was told. An assistant turn can be marked ``train=False``
(a wrong earlier answer that the user corrected): it stays in the context but is never a target.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from assistant.nano import pools

QUESTION_REQUESTS = (
    "What questions could I ask about this conversation?",
    "What questions could you answer about what I told you?",
    "Write some questions about this conversation.",
    "List questions I could ask you about what I said.",
)
RESTATE_REQUESTS = (
    "What did I tell you?",
    "Please restate what I told you.",
    "Summarize what I told you.",
    "Can you repeat everything I told you?",
)
PIECE_SHARE = 1 / 3  # of invented words, when the world is given word pieces to spell them from
ACKS = ("Got it.", "Noted.", "OK, I will remember that.", "Thanks for telling me.", "Understood.")


@dataclass(frozen=True)
class Fact:
    """One thing the user said. ``slot`` identifies what a later fact on the same topic overwrites."""

    kind: str
    subject: str
    slot: str
    value: str
    statement: str
    questions: tuple[str, ...]
    heldout_questions: tuple[str, ...]
    answer: str
    choices: int  # how many values a guesser would choose among (for the chance level)


@dataclass
class Probe:
    """A question about a session with the value its answer must contain."""

    question: str
    value: str
    answer: str
    choices: int  # how many values a guesser would choose among (for the chance level)
    at: int  # index of the assistant message that answers it (its context is everything before)


@dataclass
class Session:
    messages: list[dict] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    kind: str = "facts"
    answerable: set[str] = field(default_factory=set)  # every phrasing of a question it answers

    def say(self, role: str, content: str, train: bool = True) -> None:
        self.messages.append({"role": role, "content": content, "train": train})

    def chat(self) -> list[dict]:
        """The messages as a chat template wants them (role and content only)."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]


def article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


class World:
    """Generates sessions from the training or the held-out half of every pool."""

    def __init__(self, seed: int, heldout: bool = False, invented_share: float = 0.35,
                 pieces: Sequence[str] = (), story_share: float = 0.42, question_rate: float = 0.75,
                 revisit: float = 0.0):
        self.rng = random.Random(seed)
        self.heldout = heldout
        self.invented_share = invented_share
        self.pieces = tuple(pieces)
        self.story_share = story_share
        self.question_rate = question_rate
        self.revisit = revisit
        pick = 1 if heldout else 0
        self.names = pools.split(pools.FIRST_NAMES)[pick]
        self.pet_names = pools.split(pools.PET_NAMES)[pick]
        self.cities = pools.split(pools.CITIES)[pick]
        self.jobs = pools.split(pools.JOBS)[pick]
        self.rooms = pools.split(pools.ROOMS)[pick]
        self.objects = pools.split(pools.OBJECTS)[pick]
        self.favourites = {thing: pools.split(pool)[pick] for thing, pool in pools.FAVOURITES.items()}

    # -- values -------------------------------------------------------------------------------

    def invented(self, pool: list[str], share: float | None = None) -> str:
        """A value from ``pool``; in training, often an invented word instead.

        Invented words are random letter strings or splices of two pool words, so their tokens are
        arbitrary but word-like: a model can only answer about them by copying from its context.
        That, not memorising a pool, is the skill held-out evaluation (and later, sleep) depends on.
        """
        if self.heldout or self.rng.random() >= (self.invented_share if share is None else share):
            return self.rng.choice(pool)
        if self.pieces and self.rng.random() < PIECE_SHARE:
            return "".join(self.rng.choice(self.pieces) for _ in range(self.rng.randint(2, 3)))
        if self.rng.random() < 0.5:
            head, tail = self.rng.choice(pool), self.rng.choice(pool)
            return head[: self.rng.randint(1, len(head))] + tail[self.rng.randint(0, len(tail) - 1) :]
        letters = []
        for position in range(self.rng.randint(2, 4)):
            onset = self.rng.choice(pools.CLUSTERS) if self.rng.random() < 0.25 else self.rng.choice(pools.CONSONANTS)
            letters.append(onset + self.rng.choice(pools.VOWELS))
        if self.rng.random() < 0.4:
            letters.append(self.rng.choice(pools.CONSONANTS))
        return "".join(letters)

    def name(self) -> str:
        return self.invented(self.names).capitalize()

    def pet_name(self) -> str:
        return self.invented(self.pet_names).capitalize()

    def date(self) -> str:
        return f"{self.rng.choice(pools.MONTHS)} {self.rng.randint(1, 28)}"

    # -- facts --------------------------------------------------------------------------------

    KINDS = ("relative", "pet", "home", "job", "birthday", "favourite", "appointment", "person")

    def fact(self, kind: str | None = None, subject: str | None = None) -> Fact:
        """A random fact; with ``kind`` and ``subject``, a new value for the same slot."""
        kind = kind or self.rng.choice(self.KINDS)
        self._kind = kind
        return getattr(self, f"_{kind}")(subject)

    def _relative(self, rel: str | None) -> Fact:
        rel, v = rel or self.rng.choice(pools.RELATIVES), self.name()
        return self._make(
            rel, f"{rel}.name", v,
            [f"My {rel} is called {v}.", f"My {rel}'s name is {v}.", f"I have {article(rel)} named {v}.",
             f"{v} is my {rel}.", f"The name of my {rel} is {v}."],
            [f"What is my {rel}'s name?", f"What's my {rel} called?", f"What is the name of my {rel}?"],
            [f"Who is my {rel}?", f"Can you remind me what my {rel} is called?", f"Do you remember my {rel}'s name?"],
            f"Your {rel} is called {v}.",
            len(pools.FIRST_NAMES),
        )

    def _pet(self, pet: str | None) -> Fact:
        pet, v = pet or self.rng.choice(pools.PETS), self.pet_name()
        return self._make(
            pet, f"{pet}.name", v,
            [f"I have {article(pet)} named {v}.", f"My {pet} is called {v}.", f"My {pet}'s name is {v}.",
             f"{v} is the name of my {pet}."],
            [f"What is my {pet}'s name?", f"What's my {pet} called?", f"What is the name of my {pet}?"],
            [f"What did I name my {pet}?", f"Do you remember what my {pet} is called?"],
            f"Your {pet} is called {v}.",
            len(pools.PET_NAMES),
        )

    def _home(self, _subject: str | None) -> Fact:
        v = self.invented(self.cities).capitalize()
        return self._make(
            "", "home", v,
            [f"I live in {v}.", f"My home is in {v}.", f"I moved to {v} last year.", f"These days I live in {v}."],
            ["Where do I live?", "Which city do I live in?", "Where is my home?"],
            ["What city is my home in?", "In which city do I live?"],
            f"You live in {v}.",
            len(pools.CITIES),
        )

    def _job(self, _subject: str | None) -> Fact:
        v = self.invented(self.jobs)
        return self._make(
            "", "job", v,
            [f"I work as {article(v)}.", f"I am {article(v)}.", f"I earn my living as {article(v)}.",
             f"My job is {v}."],
            ["What do I do for a living?", "What is my job?", "What do I work as?"],
            ["What is my profession?", "What work do I do?"],
            f"You work as {article(v)}.",
            len(pools.JOBS),
        )

    def _birthday(self, _subject: str | None) -> Fact:
        v = self.date()
        return self._make(
            "", "birthday", v,
            [f"My birthday is on {v}.", f"I was born on {v}.", f"I celebrate my birthday on {v}."],
            ["When is my birthday?", "What is my birthday?", "What date is my birthday?"],
            ["On what date was I born?", "When do I celebrate my birthday?"],
            f"Your birthday is on {v}.",
            12 * 28,
        )

    def _favourite(self, thing: str | None) -> Fact:
        thing = thing or self.rng.choice(sorted(self.favourites))
        v = self.invented(self.favourites[thing])
        return self._make(
            thing, f"favourite.{thing}", v,
            [f"My favourite {thing} is {v}.", f"{v.capitalize()} is my favourite {thing}.",
             f"The {thing} I like most is {v}."],
            [f"What is my favourite {thing}?", f"Which {thing} do I like most?"],
            [f"What {thing} do I like best?", f"Do you know my favourite {thing}?"],
            f"Your favourite {thing} is {v}.",
            len(pools.FAVOURITES[thing]),
        )

    def _appointment(self, kind: str | None) -> Fact:
        kind = kind or self.rng.choice(pools.APPOINTMENTS)
        v = f"{self.rng.choice(pools.WEEKDAYS)} at {self.rng.choice(pools.TIMES)}"
        return self._make(
            kind, f"appointment.{kind}", v,
            [f"I have {article(kind)} appointment on {v}.", f"My {kind} appointment is on {v}.",
             f"I'm seeing the {kind} on {v}."],
            [f"When is my {kind} appointment?", f"When am I seeing the {kind}?"],
            [f"When do I have to go to the {kind}?", f"What day and time is my {kind} appointment?"],
            f"Your {kind} appointment is on {v}.",
            len(pools.WEEKDAYS) * len(pools.TIMES),
        )

    def _person(self, subject: str | None) -> Fact:
        who, topic = subject.split("|") if subject else (self.name(), self.rng.choice(("home", "job")))
        if topic == "home":
            v = self.invented(self.cities).capitalize()
            return self._make(
                f"{who}|home", f"{who}.home", v,
                [f"{who} lives in {v}.", f"My friend {who} lives in {v}.", f"{who}'s home is in {v}."],
                [f"Where does {who} live?", f"Which city does {who} live in?"],
                [f"In which city does {who} live?", f"Where is {who}'s home?"],
                f"{who} lives in {v}.",
                len(pools.CITIES),
            )
        v = self.invented(self.jobs)
        return self._make(
            f"{who}|job", f"{who}.job", v,
            [f"{who} works as {article(v)}.", f"My friend {who} is {article(v)}.", f"{who}'s job is {v}."],
            [f"What does {who} do for a living?", f"What is {who}'s job?"],
            [f"What is {who}'s profession?", f"What work does {who} do?"],
            f"{who} works as {article(v)}.",
            len(pools.JOBS),
        )

    def _make(self, subject, slot, value, statements, questions, heldout, answer, choices) -> Fact:
        return Fact(self._kind, subject, slot, value, self.rng.choice(statements), tuple(questions),
                    tuple(heldout), answer, choices)

    # -- sessions -----------------------------------------------------------------------------

    def telling_session(self, n_facts: int | None = None) -> Session:
        """Only facts told (one message or one per turn), no questions yet: what the user says by day."""
        session = Session(kind="facts")
        facts = self._facts(n_facts)
        self._tell(session, facts)
        return session

    def _facts(self, n_facts: int | None) -> list[Fact]:
        facts: dict[str, Fact] = {}
        for _ in range(n_facts or self.rng.randint(1, 6)):
            fact = self.fact()
            if fact.slot not in facts and fact.value not in {f.value for f in facts.values()}:
                facts[fact.slot] = fact
        return list(facts.values())

    def _tell(self, session: Session, facts: list[Fact], question_in_message: float = 0.0) -> None:
        session.answerable |= {q for f in facts for q in f.questions + f.heldout_questions}
        if self.rng.random() < 0.5 and len(facts) > 1:
            ordered = facts
            text = self._join([f.statement for f in ordered])
            if self.rng.random() < question_in_message:
                fact = self.rng.choice(ordered)
                question = self._question(fact)
                session.say("user", text + " " + question)
                session.say("assistant", fact.answer)
                self._probe(session, fact, question)
            else:
                session.say("user", text)
                session.say("assistant", self.rng.choice(ACKS))
        else:
            for fact in facts:
                session.say("user", fact.statement)
                session.say("assistant", self.rng.choice(ACKS))

    def facts_session(self, n_facts: int | None = None) -> Session:
        """Personal facts told in one message or one per turn; questions now or in later turns."""
        session = Session(kind="facts")
        ordered = self._facts(n_facts)
        self._tell(session, ordered, question_in_message=0.3)
        if self.rng.random() < 0.2:
            ordered = self._correct(session, ordered)
        self._ask(session, ordered)
        return session

    def _correct(self, session: Session, ordered: list[Fact]) -> list[Fact]:
        """The user updates a fact, or corrects a wrong answer; the newest value is the truth."""
        old = self.rng.choice(ordered)
        new = self._same_slot(old)
        if self.rng.random() < 0.5:
            session.say("user", self._question(old))
            session.say("assistant", new.answer, train=False)  # a wrong answer, never a target
            session.say("user", f"No, that's wrong. {old.statement}")
            session.say("assistant", f"Sorry about that. {old.answer}")
            return ordered
        prefix = self.rng.choice(("Correction: ", "Update: ", "Things changed. ", "I need to correct that. "))
        session.say("user", prefix + new.statement)
        session.say("assistant", self.rng.choice(ACKS))
        session.answerable |= set(new.questions + new.heldout_questions)
        return [new if f.slot == old.slot else f for f in ordered]

    def _same_slot(self, fact: Fact) -> Fact:
        while True:
            other = self.fact(fact.kind, fact.subject or None)
            if other.value != fact.value:
                return other

    def _ask(self, session: Session, facts: list[Fact]) -> None:
        """Later turns: questions about the facts, and sometimes the two sleep skills."""
        asked = self.rng.sample(facts, k=len(facts) if self.rng.random() < 0.5 else self.rng.randint(1, len(facts)))
        for fact in asked:
            question = self._question(fact)
            session.say("user", question)
            session.say("assistant", fact.answer)
            self._probe(session, fact, question)
        roll = self.rng.random()
        if roll < 0.15:
            session.say("user", self.rng.choice(QUESTION_REQUESTS))
            session.say("assistant", "\n".join(
                f"{i}. {self.rng.choice(f.questions)}" for i, f in enumerate(facts, 1)))
        elif roll < 0.3:
            session.say("user", self.rng.choice(RESTATE_REQUESTS))
            session.say("assistant", " ".join(f.answer for f in facts))

    def _question(self, fact: Fact) -> str:
        """Evaluation asks in held-out phrasings; training asks in every phrasing, so the model can
        read any of them in context, but it *writes* questions (the sleep's prompts) only in the
        training phrasings: a probe in a held-out phrasing is one that sleep never trained on."""
        if self.heldout:
            return self.rng.choice(fact.heldout_questions)
        return self.rng.choice(fact.questions + fact.heldout_questions)

    def _probe(self, session: Session, fact: Fact, question: str) -> None:
        session.probes.append(Probe(question, fact.value, fact.answer, fact.choices, len(session.messages) - 1))

    def _join(self, sentences: list[str]) -> str:
        return ("\n" if self.rng.random() < 0.4 else " ").join(sentences)

    # -- stories ------------------------------------------------------------------------------

    MOVES = ("moved to the", "went to the", "journeyed to the", "travelled to the", "went back to the",
             "walked to the", "ran to the")

    def story_session(self) -> Session:
        """People moving between rooms, told in chunks; "Where is X?" is answered by the latest move.

        Half of the questions ask about someone other than the last one to move (when there is
        one), so that "the room mentioned last" is right only about a third of the time. At the
        first generator's rate (60%), the model settled on that shortcut instead of learning to
        find the asked person's latest move, and answered bAbI, where it is right 53% of the time,
        at 46%.
        """
        session = Session(kind="story")
        people = self._distinct(self.name)
        rooms = self._distinct(lambda: self.invented(self.rooms))
        where: dict[str, str] = {}
        moves: dict[str, int] = {}
        pending: list[str] = []
        last = ""
        for _ in range(self.rng.randint(4, 8)):
            for _ in range(self.rng.randint(1, 3)):
                people_placed = [p for p in people if p in where]
                if self.rng.random() < 0.1 and people_placed:
                    carrier = self.rng.choice(people_placed)
                    thing = self.invented(self.objects)
                    pending.append(f"{carrier} left the {thing} in the {where[carrier]}.")
                    where[f"the {thing}"] = last = where[carrier]
                    continue
                who = self.rng.choice(people)
                to = self.rng.choice([r for r in rooms if r != where.get(who)])
                pending.append(f"{who} {self.rng.choice(self.MOVES)} {to}.")
                where[who] = last = to
                moves[who] = moves.get(who, 0) + 1
            if self.rng.random() < self.question_rate or not pending:
                elsewhere = sorted(s for s in where if where[s] != last)
                again = sorted(s for s in elsewhere if moves.get(s, 0) > 1)
                if again and self.revisit and self.rng.random() < self.revisit:
                    subject = self.rng.choice(again)
                else:
                    subject = self.rng.choice(elsewhere if elsewhere and self.rng.random() < 0.5 else sorted(where))
                question = f"Where is {subject}?"
                answer = f"{subject[0].upper() + subject[1:]} is in the {where[subject]}."
                session.say("user", self._join(pending + [question]))
                session.say("assistant", answer)
                session.probes.append(Probe(question, where[subject], answer, len(pools.ROOMS), len(session.messages) - 1))
                pending = []
        if pending:
            session.say("user", self._join(pending))
            session.say("assistant", self.rng.choice(ACKS))
        roll = self.rng.random()
        people_there = [p for p in people if p in where]
        session.answerable |= {f"Where is {p}?" for p in people_there}
        if roll < 0.15 and people_there:
            session.say("user", self.rng.choice(QUESTION_REQUESTS))
            session.say("assistant", "\n".join(f"{i}. Where is {p}?" for i, p in enumerate(people_there, 1)))
        elif roll < 0.3 and people_there:
            session.say("user", self.rng.choice(RESTATE_REQUESTS))
            session.say("assistant", " ".join(f"{p} is in the {where[p]}." for p in people_there))
        return session

    def _distinct(self, draw) -> list[str]:
        """3 to 6 different values of ``draw()``."""
        values: list[str] = []
        while len(values) < self.rng.randint(3, 6):
            value = draw()
            if value not in values:
                values.append(value)
        return values

    # -- small talk ---------------------------------------------------------------------------

    SMALL_TALK = {
        ("Hello!", "Hi", "Hi there!", "Good morning!", "Hey", "Good evening."):
            ("Hello! How can I help you today?", "Hi! What would you like to talk about?"),
        ("Thanks!", "Thank you.", "Thanks a lot, that helps.", "Great, thank you!"):
            ("You're welcome!", "Glad I could help."),
        ("What can you do?", "How can you help me?", "What are you for?"):
            ("I can chat with you and remember what you tell me: people, places, dates and plans. "
             "While you are away I sleep, and sleeping moves what you told me into my memory.",),
        ("Who are you?", "What is your name?", "What's your name?"):
            ("I am Somnus, a small assistant that runs on your own computer and learns while it sleeps.",),
        ("How are you?", "How are you doing?"):
            ("I'm doing well, thank you. How can I help?",),
        ("Bye!", "Goodbye.", "See you tomorrow.", "Good night!"):
            ("Goodbye! I will sleep on what you told me.", "Good night!"),
    }

    def small_talk_session(self) -> Session:
        session = Session(kind="small_talk")
        for _ in range(self.rng.randint(1, 3)):
            prompts, replies = self.rng.choice(list(self.SMALL_TALK.items()))
            session.say("user", self.rng.choice(prompts))
            session.say("assistant", self.rng.choice(replies))
        return session

    SMALL_TALK_SHARE = 0.08  # of sessions; the rest are stories (``story_share``) and facts

    def session(self) -> Session:
        """One training session, with the mix the nano model is trained on."""
        roll = self.rng.random()
        stories_end = 1 - self.SMALL_TALK_SHARE
        if roll < stories_end - self.story_share:
            return self.facts_session()
        if roll < stories_end:
            return self.story_session()
        return self.small_talk_session()
