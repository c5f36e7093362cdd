"""The sleep cycle: consolidating the day's sessions into LoRA blocks, then rehearsing them.

Stage 1, Knowledge Seeding, distils the model with the session in context (teacher) into a grown
model without it (student) and rewards the student for imitating the teacher's continuations;
stage 2, Dreaming, rehearses sampled dreams with group RL (Behrouz et al., "Language Models Need
Sleep"). ``losses`` and ``rewards`` hold the pure mathematics of both stages, engine-independent.

What the rest of Somnus uses of it is named here, so the app, the CLI and the scheduler never reach
into its stages: start a sleep (in its own process) or wait for one, ask whether one runs, hold
off every night (the lock), and word what a night's consolidation kept.
"""

from assistant.sleep.gate import kept_training
from assistant.sleep.runner import SleepBusy, is_sleeping, sleep_lock, sleep_now, start_sleep

__all__ = ["SleepBusy", "is_sleeping", "kept_training", "sleep_lock", "sleep_now", "start_sleep"]
