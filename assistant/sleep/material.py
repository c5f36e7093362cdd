"""The generic material a night needs besides the user's sessions, for any model.

Two kinds, both held by likelihood against the model before the stack's first night, never matched
as strings, so they serve a model that reads them well and one that reads them badly alike:

- everyday prompts, whose answers anchor the new block to the pre-sleep model (a night that teaches
  the user's facts must not change small talk, general knowledge or instructions); none asks about
  the user, which is what a night is meant to change;
- reading exercises, a short text and a question about it, for the gate's in-context check: the
  candidate must stay as sure as the bare model of the bare model's own answer, with the text in
  context (a block that answers from memory must not stop reading what it is given).

Every name and value in the reading exercises is invented, so the answer can only come from the text.
``Material`` is the seam: a model with material of its own (another language, a domain) passes its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

Chat = list[dict]


class Material(Protocol):
    def everyday(self) -> list[Chat]:
        """Chats that end with a user turn, whose reply the night must leave as it was."""

    def readings(self) -> list[Chat]:
        """Chats that give a text and end with a question about it, for the in-context check."""


EVERYDAY = (
    "Hello!", "Hi, how are you today?", "Good morning!", "Can you help me with something?", "Thanks for your help.",
    "What is the capital of Italy?", "How many days are in a week?", "What is 12 plus 7?", "Tell me a short joke.",
    "What is photosynthesis?", "Give me a tip for sleeping better.", "What is the boiling point of water?",
    "Write a haiku about the sea.", "How do I make a cup of tea?", "What does a computer's CPU do?",
    "Name three fruits.", "What is the largest planet in the solar system?", "Who wrote Romeo and Juliet?",
    "How can I stay focused while studying?", "What is the opposite of hot?", "Translate 'thank you' into Spanish.",
    "What is a noun?", "Suggest a name for a pet fish.", "How many continents are there?", "What is gravity?",
    "Give me a synonym for happy.", "What should I pack for a beach trip?", "Explain what a recipe is.",
    "What time zone is London in?", "How do plants drink water?", "What is the square root of 81?",
    "Recommend a hobby for a rainy day.", "What is the color of grass?", "Why do we need sleep?",
    "What is a healthy breakfast?", "How do I say hello in French?", "What animal is known as man's best friend?",
    "What is the freezing point of water in Celsius?", "Write one sentence about autumn.", "What is an email?",
    "Good night!", "How many hours are in a day?", "What is the main language spoken in Brazil?",
    "Give me a quick stretching exercise.", "What is a verb?", "What is the tallest mountain on Earth?",
    "How do I boil an egg?", "What does a doctor do?", "Name a famous painter.", "What is rain made of?",
)

# (text, question): a user shares a text and asks about it; every value is invented.
READINGS = (
    ("My neighbour Talvo Brenning keeps three goats called Pim, Odra and Vesk.", "What are the goats called?"),
    ("The Quillen bakery opens at 6:40 and closes at 14:15 on weekdays.", "When does the bakery close?"),
    ("Our team lead is Mirela Ostak; she joined from Harwick Labs in March.", "Where did Mirela work before?"),
    ("The parcel for Denno Ruel was left at locker 47 in the Sarsby depot.", "Which locker has the parcel?"),
    ("Yara's flight to Vellmont leaves from gate C19 at 21:05.", "Which gate does Yara's flight leave from?"),
    ("I painted the shed a colour called Marrow Teal, code MT-338.", "What is the colour's code?"),
    ("Brother Kessim fixed my bicycle and charged me 23 euros.", "How much did the repair cost?"),
    ("The wifi password at the cabin is lumen-frost-82.", "What is the wifi password?"),
    ("Aunt Oriel grows a pear tree she named Bastien.", "What did Aunt Oriel name her tree?"),
    ("My dentist, Dr. Feodra Lask, moved her practice to Cobble Row.", "Where is the dentist's practice now?"),
    ("The book club meets on the second Thursday at the Wren & Quill cafe.", "Where does the book club meet?"),
    ("Tomas's hamster is called Nubbin and is four months old.", "How old is the hamster?"),
    ("The lake house is 14 km past the village of Ardlow.", "Which village is the lake house past?"),
    ("Our landlord, Perrin Ashgrove, wants the rent by the 3rd.", "Who is the landlord?"),
    ("I keep the spare key under the blue planter by the back door.", "Where is the spare key?"),
    ("The choir is rehearsing a song called 'Lanterns over Ebbing'.", "Which song is the choir rehearsing?"),
    ("Nadia switched her phone plan to Corvel Mobile last week.", "Which phone company is Nadia with now?"),
    ("The recipe needs 340 grams of flour and two eggs.", "How much flour does the recipe need?"),
    ("My cousin Ilse studies marine botany in Port Haskel.", "What does Ilse study?"),
    ("The meeting moved from room 2B to the Juniper room.", "Where is the meeting now?"),
    ("Grandpa's boat is named the Saltwren and is moored at pier 9.", "What is the boat called?"),
    ("Ezra's favourite board game is Copperfall.", "What is Ezra's favourite board game?"),
    ("The gym on Lindqvist Street charges 31 euros a month.", "How much does the gym charge?"),
    ("Our new puppy, a grey whippet, is called Sorrel.", "What is the puppy called?"),
    ("Kaito planted tomatoes, basil and a row of kohlrabi.", "What did Kaito plant besides tomatoes and basil?"),
    ("The museum's night tour starts at the east wing at 19:30.", "Where does the night tour start?"),
    ("My pen pal Ottilie lives in a town called Marrowby.", "Which town does Ottilie live in?"),
    ("The car is booked for service on Friday at Brask Motors.", "Where is the car being serviced?"),
    ("Leonie's violin teacher is Mr. Aurel Danescu.", "Who teaches Leonie the violin?"),
    ("The allotment is plot 112, next to the old water tower.", "Which plot is the allotment?"),
)

_ACK = "Got it."


@dataclass(frozen=True)
class PackagedMaterial:
    """The material that ships with Somnus: English, for any chat model."""

    def everyday(self) -> list[Chat]:
        return [[{"role": "user", "content": prompt}] for prompt in EVERYDAY]

    def readings(self) -> list[Chat]:
        return [[{"role": "user", "content": text}, {"role": "assistant", "content": _ACK},
                 {"role": "user", "content": question}] for text, question in READINGS]


PACKAGED = PackagedMaterial()
