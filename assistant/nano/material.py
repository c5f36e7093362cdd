"""The nano model's own material for the sleep (``assistant.sleep.material.Material``).

Nano reads only the little world it was trained on; English it never saw tells nothing of how it
reads. So its anchors and its gate's readings come from that world: small talk, stories and facts
with invented names and values (what the user tells is new to the model, and copying a word it
never saw is what a night breaks first), cut before a question about them.
"""

from __future__ import annotations

from dataclasses import dataclass

from assistant.nano import evaluate
from assistant.nano.world import World


@dataclass(frozen=True)
class NanoMaterial:
    seed: int = 17
    count: int = 60

    def everyday(self) -> list[list[dict]]:
        world = World(self.seed, invented_share=1.0)
        kinds = (world.small_talk_session, world.story_session, world.facts_session)
        chats = []
        for index in range(self.count):
            session = kinds[index % 3]()
            chats.append(session.chat()[: session.probes[0].at if session.probes else 1])
        return chats

    def readings(self) -> list[list[dict]]:
        return [session.chat()[: probe.at] for session in evaluate.heldout_sessions(self.seed + 4225, self.count // 2)
                for probe in session.probes[:1]]
