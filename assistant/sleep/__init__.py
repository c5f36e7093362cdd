"""The sleep cycle: consolidating the day's sessions into LoRA blocks, then rehearsing them.

Stage 1, Knowledge Seeding, distils the model with the session in context (teacher) into a grown
model without it (student) and rewards the student for imitating the teacher's continuations;
stage 2, Dreaming, rehearses sampled dreams with group RL (Behrouz et al., "Language Models Need
Sleep"). ``losses`` and ``rewards`` hold the pure mathematics of both stages, engine-independent.
"""
