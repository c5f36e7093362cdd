"""Word pools for the nano world: names, places, jobs and the rest.

Every pool is split deterministically into a training part and a held-out part (every fifth item),
so evaluation asks about entities the model has never seen in training and must copy from context.
"""

from __future__ import annotations

FIRST_NAMES = """
Aaron Abigail Adam Adrian Aisha Alan Albert Alexander Alice Amara Amelia Andre Andrew Angela Anna
Anton Arjun Arthur Astrid Ava Beatrice Ben Bianca Boris Bruno Caleb Camila Carlos Carmen Caroline
Cecilia Charles Chloe Clara Colin Daniel Daria David Diana Diego Dmitri Dora Edgar Edith Eleanor Elena
Elias Eliza Emil Emily Emma Enzo Eric Erin Esther Ethan Eva Fabian Farah Felix Fiona Frank Freya
Gabriel Gemma George Gina Grace Greta Hana Hannah Harold Harry Hector Helen Henry Hugo Ian Ida Igor
Ines Irene Isaac Isabel Ivan Jack Jade James Jana Jasper John Jonas Jorge Joseph Julia Julian June
Karim Karl Kate Keith Kenji Kira Lara Laura Leo Leon Lila Lily Linda Lucas Lucy Luis Luka Maya Marco
Maria Marta Martin Mary Mateo Max Mei Mia Miguel Milan Mina Mohammed Nadia Naomi Nathan Nia Nina Noah
Nora Oliver Olivia Omar Oscar Owen Pablo Paula Peter Petra Priya Quentin Rafael Rahul Rania Rosa Ruben
Ruth Samuel Sandra Sara Sean Selma Simon Sofia Sophie Stella Stefan Tara Theo Thomas Tobias Tom Ursula
Uma Valentina Victor Vera Wanda Walter Xavier Yara Yusuf Zara Zoe
""".split()

PET_NAMES = """
Rex Bella Max Luna Charlie Daisy Rocky Milo Coco Buddy Ginger Oscar Pepper Shadow Simba Nala Biscuit
Bailey Toby Rosie Bruno Maple Whiskers Mittens Pickles Noodle Peanut Waffles Cookie Muffin Pumpkin
Ziggy Oreo Jasper Hazel Willow Scout Ranger Bandit Smokey Tigger Felix Mocha Sunny Clover Juniper
Pebbles Socks Dexter Marley Apollo Zeus Thor Nova Kiwi Mango Olive Poppy Sage Chester Gizmo Pippin
Barney Sparky Goldie Fluffy Button Dotty Blossom Caramel Truffle Nugget Bear Duke Lady Prince Rusty
""".split()

CITIES = """
Porto Lisbon Madrid Seville Valencia Paris Lyon Marseille Nantes Berlin Hamburg Munich Cologne Vienna
Zurich Geneva Milan Turin Naples Florence Venice Rome Athens Sofia Bucharest Budapest Prague Krakow
Warsaw Gdansk Riga Tallinn Vilnius Helsinki Stockholm Oslo Bergen Copenhagen Aarhus Amsterdam
Rotterdam Utrecht Brussels Antwerp Ghent Dublin Cork Galway Edinburgh Glasgow Manchester Leeds Bristol
London Cardiff Boston Chicago Denver Seattle Portland Austin Dallas Houston Phoenix Toronto Montreal
Vancouver Ottawa Calgary Lima Quito Bogota Santiago Montevideo Havana Cairo Tunis Nairobi Accra Lagos
Dakar Mumbai Delhi Chennai Kolkata Dhaka Hanoi Bangkok Manila Jakarta Seoul Busan Osaka Kyoto Sapporo
Perth Sydney Melbourne Brisbane Adelaide Auckland Wellington
""".split()

JOBS = """
nurse teacher baker plumber pilot architect carpenter chef dentist doctor electrician engineer farmer
firefighter gardener journalist lawyer librarian mechanic musician painter pharmacist photographer
physicist police officer potter programmer sailor scientist surgeon tailor translator veterinarian
waiter writer accountant actor astronaut barber biologist butcher cashier chemist designer
economist editor florist geologist historian illustrator jeweller judge lecturer locksmith
midwife miner optician paramedic poet psychologist receptionist sculptor shepherd singer
""".split()
JOBS = [j for j in JOBS if j not in ("police",)]  # "police officer" is two words: keep the pool one word each

COLOURS = """
red blue green yellow orange purple pink brown black white grey teal turquoise navy maroon olive
lavender beige crimson gold silver amber coral indigo violet magenta cyan ivory scarlet emerald
""".split()

FOODS = """
pizza pasta sushi curry tacos burritos ramen paella lasagna risotto dumplings pancakes waffles
omelette salad soup chili couscous falafel hummus kebab noodles burgers steak lentils porridge
goulash moussaka gnocchi ravioli tapas crepes quiche samosas biryani pho tempura gazpacho ceviche
""".split()

SPORTS = """
football tennis basketball cricket rugby hockey golf swimming cycling running rowing sailing skiing
surfing climbing boxing fencing judo karate volleyball badminton baseball handball squash archery
""".split()

DRINKS = """
coffee tea lemonade cocoa milk juice water cider kombucha smoothie espresso cappuccino latte
""".split()

INSTRUMENTS = """
piano guitar violin cello flute trumpet drums harp clarinet saxophone ukulele banjo accordion oboe
""".split()

FLOWERS = "rose tulip daisy lily orchid sunflower poppy iris lilac peony jasmine violet magnolia".split()

FAVOURITES = {
    "colour": COLOURS, "food": FOODS, "sport": SPORTS, "drink": DRINKS, "instrument": INSTRUMENTS,
    "flower": FLOWERS,
}

RELATIVES = """
sister brother mother father cousin aunt uncle grandmother grandfather partner son daughter boss
neighbour colleague friend niece nephew landlord
""".split()

PETS = "dog cat parrot hamster rabbit goldfish horse turtle pony ferret tortoise canary".split()

APPOINTMENTS = """
dentist doctor hairdresser vet optician physiotherapist lawyer accountant bank barber
""".split()

WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = """
January February March April May June July August September October November December
""".split()
TIMES = [f"{h} {m}" for h in range(1, 13) for m in ("am", "pm")] + [
    f"{h}:30 {m}" for h in range(1, 13) for m in ("am", "pm")
]

ROOMS = """
hallway bathroom kitchen garden office bedroom cellar attic garage library lounge porch balcony
pantry studio basement playroom laundry conservatory dining room
""".split()
ROOMS = [r for r in ROOMS if r not in ("dining", "room")]

OBJECTS = """
apple football milk book key umbrella lamp cup pen box ball hat bag phone wallet
""".split()

ALL = (FIRST_NAMES, PET_NAMES, CITIES, JOBS, *FAVOURITES.values(), RELATIVES, PETS, APPOINTMENTS, WEEKDAYS,
       MONTHS, ROOMS, OBJECTS)

CONSONANTS = "bcdfghjklmnprstvwz"
CLUSTERS = ("br", "ch", "dr", "fl", "gr", "kr", "pl", "sh", "st", "th", "tr", "nd", "rk", "lt")
VOWELS = "aeiouy"


def split(pool: list[str]) -> tuple[list[str], list[str]]:
    """(training, held-out): every fifth item of the sorted pool is held out for evaluation."""
    ordered = sorted(set(pool))
    held_out = ordered[2::5]
    return [w for w in ordered if w not in held_out], held_out
