"""Deterministic synthetic English-like corpus in the record format of C4 (``allenai/c4``, ``en``).

The project must pre-train and test offline, so instead of downloading C4 it ships a small corpus generated
here.  A seeded *fictional world* (regions, towns with mayors and rivers, people with jobs and hometowns,
companies and their products, recipes, restaurants, sports teams, festivals, hotels) is built first; a dozen
document templates (local news, recipe, product review, travel blog, how-to guide, forum thread, event
announcement, obituary, real-estate listing, match report, company news, restaurant review, job posting)
then write documents about it.  Facts never change between documents (a town always has the same mayor, a
product always the same maker and price), while wording varies through synonyms, optional sentences and
clause order, and numbers such as scores, dates and quantities are drawn per document.  A language model can
therefore learn a lot, but not everything, from the text.

Every record is a JSON object with exactly C4's fields ``text``, ``timestamp`` and ``url``, one per line, in
gzip files named like C4's shards.  Output is byte-identical for a given seed on every machine: all
randomness comes from ``random.Random`` instances seeded with integers derived by SHA-256 (never ``hash()``
or the clock), and gzip headers carry ``mtime=0`` and no file name.

The files shipped in ``rso_ray/data/embedded`` are exactly what the default arguments produce::

    python -m rso_ray.data.corpus --out rso_ray/data/embedded --train-tokenizer

``--train-tokenizer`` additionally trains the byte-level BPE tokenizer (see
:mod:`rso_ray.data.tokenizer_training`) on the train split and saves it to ``OUT/tokenizer``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import hashlib
import io
import json
import math
import random
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SEED = 20190425
DEFAULT_TRAIN_SHARDS = 8
DEFAULT_DOCS_PER_SHARD = 1700
DEFAULT_VALIDATION_DOCS = 620
SPLITS = ("train", "validation")

# Documents are dated inside C4's crawl window (the April 2019 Common Crawl snapshot holds pages first seen
# over the previous years); the exact range only matters for realism.
_FIRST_DAY = dt.date(2016, 1, 1)
_LAST_DAY = dt.date(2019, 4, 30)

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
# Own tables instead of strftime("%A"), which depends on the machine's locale.
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


# ---------------------------------------------------------------------------------------------------------
# Seeds and the template mini-language
# ---------------------------------------------------------------------------------------------------------


def derive_seed(seed: int, *labels: object) -> int:
    """Derive an independent 64-bit seed from ``seed`` and labels, identically on every machine.

    SHA-256 instead of ``hash()``: string hashing is salted per process, so it would break determinism.
    """
    key = "/".join([str(seed), *map(str, labels)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


_ALT_RE = re.compile(r"\[([^\[\]]*)\]")
_SLOT_RE = re.compile(r"\{(\w+)\}")
_SPACES_RE = re.compile(r" {2,}")


def expand(rng: random.Random, template: str, slots: dict[str, Any] | None = None, capitalize: bool = True) -> str:
    """Fill a sentence template.

    ``[a|b|c]`` picks one alternative uniformly, ``[?text]`` keeps ``text`` with probability 1/2 (both may
    nest; the innermost brackets are resolved first, left to right, so the RNG is consumed in a fixed
    order), and ``{name}`` is replaced by ``str(slots[name])``.  Whitespace left by dropped options is
    tidied and, unless ``capitalize`` is false (fragments used inside other sentences), the first letter is
    capitalised, since most templates are whole sentences.
    """
    text = template
    while "[" in text:
        text = _ALT_RE.sub(lambda m: _choose(rng, m.group(1)), text)
    if slots is not None and "{" in text:
        text = _SLOT_RE.sub(lambda m: str(slots[m.group(1)]), text)
    text = _SPACES_RE.sub(" ", text).replace(" ,", ",").replace(" .", ".").replace(" :", ":").strip()
    text = text.replace(".m..", ".m.")  # a sentence ending in "a.m." needs no second period
    return text[:1].upper() + text[1:] if capitalize else text


def _choose(rng: random.Random, body: str) -> str:
    if body.startswith("?"):
        return body[1:] if rng.random() < 0.5 else ""
    return rng.choice(body.split("|"))


def a_an(phrase: str) -> str:
    """Prefix ``phrase`` with the right indefinite article (good enough for this vocabulary)."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def slugify(title: str, max_words: int = 9) -> str:
    """URL slug as blogs and newspapers make them: lower case words joined by hyphens."""
    words = re.findall(r"[a-z0-9]+", title.lower().replace("'", ""))
    return "-".join(words[:max_words])


def money(amount: float) -> str:
    """``$1,250`` for round amounts, ``$49.99`` otherwise."""
    if abs(amount - round(amount)) < 1e-9:
        return f"${round(amount):,}"
    return f"${amount:,.2f}"


def long_date(day: dt.date) -> str:
    return f"{MONTHS[day.month - 1]} {day.day}, {day.year}"


def join_list(items: Sequence[str]) -> str:
    """English list with an Oxford comma: ``a, b, and c``."""
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + ", and " + items[-1]


_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def small_number(n: int) -> str:
    """Newspaper style: spell out numbers below ten."""
    return _NUMBER_WORDS[n] if 0 <= n < 10 else str(n)


# ---------------------------------------------------------------------------------------------------------
# Lexicon
# ---------------------------------------------------------------------------------------------------------

FEMALE_NAMES = (
    "Maria", "Emma", "Olivia", "Sophia", "Grace", "Hannah", "Claire", "Laura", "Rachel", "Julia",
    "Anna", "Elena", "Nora", "Ruth", "Alice", "Helen", "Margaret", "Susan", "Karen", "Linda",
    "Megan", "Sarah", "Emily", "Jessica", "Amy", "Rose", "Lucy", "Isabel", "Diana", "Fiona",
    "Irene", "Joan", "Kate", "Leah", "Molly", "Naomi", "Paula", "Rita", "Sandra", "Tessa",
    "Vera", "Wendy", "Yvonne", "Zoe", "Beth", "Carmen", "Daisy", "Ellen", "Frances", "Gloria",
    "Ivy", "Janet", "Keiko", "Lena", "Mira", "Nadia", "Priya", "Rosa", "Sofia", "Tara",
    "Ursula", "Valerie", "Aisha", "Bianca", "Celia", "Denise", "Eva", "Farah", "Gemma", "Heidi",
)  # fmt: skip
MALE_NAMES = (
    "James", "John", "Robert", "Michael", "David", "William", "Thomas", "Daniel", "Paul", "Mark",
    "George", "Edward", "Peter", "Henry", "Samuel", "Andrew", "Joseph", "Charles", "Frank", "Walter",
    "Arthur", "Albert", "Victor", "Oscar", "Hugo", "Felix", "Leo", "Max", "Simon", "Adam",
    "Ben", "Carl", "Dennis", "Eric", "Gavin", "Harold", "Ian", "Jack", "Kevin", "Luis",
    "Martin", "Neil", "Owen", "Patrick", "Quentin", "Ray", "Scott", "Tom", "Vincent", "Wesley",
    "Aaron", "Bruno", "Colin", "Dylan", "Elliot", "Fred", "Grant", "Hector", "Isaac", "Jonah",
    "Kenji", "Liam", "Marco", "Nathan", "Omar", "Rafael", "Stefan", "Theo", "Ravi", "Ahmed",
)  # fmt: skip
LAST_NAMES = (
    "Smith", "Johnson", "Miller", "Davis", "Garcia", "Wilson", "Anderson", "Taylor", "Moore", "Jackson",
    "Martin", "Lee", "Thompson", "White", "Harris", "Clark", "Lewis", "Walker", "Hall", "Allen",
    "Young", "King", "Wright", "Lopez", "Hill", "Scott", "Green", "Adams", "Baker", "Nelson",
    "Carter", "Mitchell", "Perez", "Roberts", "Turner", "Phillips", "Campbell", "Parker", "Evans", "Edwards",
    "Collins", "Stewart", "Morris", "Rogers", "Reed", "Cook", "Morgan", "Bell", "Murphy", "Bailey",
    "Rivera", "Cooper", "Richardson", "Cox", "Howard", "Ward", "Torres", "Peterson", "Gray", "Ramirez",
    "Watson", "Brooks", "Kelly", "Sanders", "Price", "Bennett", "Wood", "Barnes", "Ross", "Henderson",
    "Coleman", "Jenkins", "Perry", "Powell", "Long", "Patterson", "Hughes", "Flores", "Washington", "Butler",
    "Foster", "Gonzales", "Bryant", "Alexander", "Russell", "Griffin", "Diaz", "Hayes", "Myers", "Ford",
    "Hamilton", "Graham", "Sullivan", "Wallace", "Woods", "Cole", "West", "Jordan", "Owens", "Reynolds",
    "Fisher", "Ellis", "Harrison", "Gibson", "McDonald", "Cruz", "Marshall", "Ortiz", "Gomez", "Murray",
    "Freeman", "Wells", "Webb", "Simpson", "Stevens", "Tucker", "Porter", "Hunter", "Hicks", "Crawford",
    "Henry", "Boyd", "Mason", "Morales", "Kennedy", "Warren", "Dixon", "Ramos", "Reyes", "Burns",
    "Gordon", "Shaw", "Holmes", "Rice", "Robertson", "Hunt", "Black", "Daniels", "Palmer", "Mills",
    "Nichols", "Grant", "Knight", "Ferguson", "Rose", "Stone", "Hawkins", "Dunn", "Perkins", "Hudson",
    "Novak", "Kowalski", "Nakamura", "Tanaka", "Okafor", "Mensah", "Larsen", "Lindqvist", "Rossi", "Bianchi",
)  # fmt: skip

TOWN_PREFIXES = (
    "Ash", "Brook", "Cedar", "Elm", "Fair", "Glen", "Hawk", "Kings", "Maple", "Mill",
    "Oak", "Pine", "Rose", "Stone", "Sun", "Wolf", "Amber", "Bright", "Clear", "Copper",
    "Crow", "Deer", "Ever", "Fox", "Gold", "High", "Holly", "Lark", "Marsh", "Mist",
    "Raven", "Salt", "Thorn", "Willow", "Winter", "Birch", "Bramble", "Heather", "Orchard", "Swan",
)  # fmt: skip
TOWN_SUFFIXES = (
    "ford", "field", "ton", "wood", "bury", "dale", "haven", "ridge", "port", "brook",
    "stead", "wick", "mouth", "ham", "view", "gate", "ley", "more", "crest", "by",
)  # fmt: skip
# (name, climate, typical industry of the region)
REGIONS = (
    ("Northmoor", "cool and windy", "sheep farming"),
    ("Greendale", "mild and rainy", "dairy farming"),
    ("Westhaven", "mild and foggy", "fishing"),
    ("Ironvale", "cold and snowy", "mining"),
    ("Lakemere", "warm in summer and cold in winter", "tourism"),
    ("Redmesa", "hot and dry", "cattle ranching"),
    ("Pinecrest", "cool and damp", "logging"),
    ("Sunmarsh", "hot and humid", "rice farming"),
)
RIVER_NAMES = (
    "Alder", "Brennan", "Calder", "Dunmore", "Elwood", "Fenwick", "Garrow", "Harlow",
    "Isen", "Kestrel", "Lorne", "Merrow", "Nettle", "Orwell", "Pellam", "Tamsin",
)  # fmt: skip
TOWN_INDUSTRIES = (
    "fishing", "textile mills", "tourism", "logging", "shipbuilding", "wine making", "coal mining",
    "furniture making", "apple orchards", "dairy farming", "software", "glass making", "paper mills",
    "cheese making", "brewing", "pottery", "railway workshops", "wool", "salt works", "boat building",
)  # fmt: skip
# Landmark patterns; "{town}", "{river}", "{last}" are filled when the world is built.
LANDMARKS = (
    ("the {town} Museum of History", "museum"),
    ("the old stone bridge over the {river} River", "bridge"),
    ("{last} Park", "park"),
    ("the {town} Botanical Garden", "garden"),
    ("the clock tower on Main Street", "tower"),
    ("the {town} Opera House", "theater"),
    ("the {last} Art Gallery", "gallery"),
    ("the covered market on Market Square", "market"),
    ("the {town} Lighthouse", "lighthouse"),
    ("the old railway station", "station"),
    ("the {last} Memorial Library", "library"),
    ("Saint {first}'s Church", "church"),
    ("the {river} Riverside Walk", "walk"),
    ("the {town} Zoo", "zoo"),
    ("the {town} Science Center", "science center"),
    ("the ruins of {town} Castle", "castle"),
)
NEWSPAPER_WORDS = ("Gazette", "Herald", "Times", "Courier", "Post", "Tribune", "Chronicle", "Observer")
TEAM_MASCOTS = (
    "Hawks", "Wolves", "Bears", "Lions", "Foxes", "Eagles", "Rovers", "Rangers", "Pioneers", "Tigers",
    "Falcons", "Otters", "Badgers", "Stags", "Ravens", "Pirates", "Miners", "Millers", "Mariners", "Comets",
)  # fmt: skip
TEAM_COLORS = (
    "red and white", "blue and gold", "green and black", "orange and navy", "purple and white",
    "black and yellow", "sky blue and white", "maroon and silver",
)  # fmt: skip
STADIUM_WORDS = ("Park", "Field", "Stadium", "Ground", "Arena")
FESTIVAL_THEMES = (
    ("Apple", "apple pies, cider and a pie eating contest"),
    ("Jazz", "live jazz bands on three stages"),
    ("Harvest", "a farmers market, hay rides and a pumpkin contest"),
    ("Lantern", "a lantern parade along the river and food stalls"),
    ("Kite", "a kite flying contest and picnic games"),
    ("Cheese", "cheese tasting, cooking shows and a market"),
    ("Film", "outdoor film screenings and talks with directors"),
    ("Folk Music", "folk music, dancing and craft stalls"),
    ("Seafood", "oyster stands, chowder tasting and boat tours"),
    ("Winter Lights", "light displays, ice skating and hot chocolate"),
    ("Book", "author readings, a used book sale and writing workshops"),
    ("Flower", "flower shows, garden tours and a plant sale"),
    ("Chili", "a chili cook-off, live music and a street market"),
    ("Balloon", "hot air balloon rides and evening fireworks"),
    ("Strawberry", "strawberry picking, jam tasting and a fun run"),
    ("Wool", "sheep shearing shows, knitting classes and a craft fair"),
)
HOTEL_WORDS = ("Inn", "Hotel", "Lodge", "Guest House", "Suites", "Bed and Breakfast")
HOTEL_PREFIXES = ("Riverside", "Old Mill", "Grand", "Harbor View", "Maple", "Station", "Parkside", "Crown",
                  "Willow", "Hilltop", "Market Square", "Lantern")  # fmt: skip

# (job title, how the job is usually described)
COMMON_JOBS = (
    "nurse", "teacher", "carpenter", "electrician", "plumber", "accountant", "librarian", "baker",
    "farmer", "police officer", "firefighter", "dentist", "pharmacist", "mechanic", "architect",
    "lawyer", "bus driver", "postal worker", "graphic designer", "photographer", "veterinarian",
    "software developer", "shop owner", "retired teacher", "retired engineer", "waiter", "painter",
    "hairdresser", "physical therapist", "social worker", "tailor", "florist", "fisherman", "banker",
    "civil engineer", "doctor", "musician", "high school coach", "truck driver", "gardener",
)  # fmt: skip
HOBBIES = (
    "gardening", "fishing", "bird watching", "painting", "playing the piano", "hiking", "baking",
    "woodworking", "knitting", "reading mystery novels", "playing chess", "cycling", "sailing",
    "photography", "singing in the church choir", "camping", "cooking for friends", "playing cards",
    "collecting stamps", "dancing", "restoring old cars", "volunteering at the library",
)  # fmt: skip

# Companies: name parts and industries.  Each industry lists product categories:
# (category noun, low price, high price, features, pros, cons).
COMPANY_PREFIXES = (
    "North", "Blue", "Bright", "Summit", "Copper", "Iron", "Clear", "True", "Wild", "Red",
    "Silver", "Green", "Falcon", "Harbor", "Stone", "Cedar", "Apex", "Polar", "River", "Oak",
)  # fmt: skip
COMPANY_SUFFIXES = ("wind", "line", "peak", "field", "craft", "works", "wave", "point", "mark", "forge", "path",
                    "light")  # fmt: skip
MODEL_WORDS = (
    "Trail", "Pro", "Lite", "Max", "Nova", "Edge", "Core", "Aero", "Vista", "Terra", "Pulse", "Echo",
    "Atlas", "Orbit", "Zen", "Flex", "Prime", "Spark", "Quest", "Breeze",
)  # fmt: skip
MODEL_SUFFIXES = ("", "", " 2", " 3", " X", " S", " Plus", " 100", " 200", " 500", " Mini", " XL")


@dataclass(frozen=True)
class Category:
    noun: str
    low: int
    high: int
    features: tuple[str, ...]
    pros: tuple[str, ...]
    cons: tuple[str, ...]

    @property
    def pronoun(self) -> str:
        """Pros and cons are verb phrases; plural nouns ("hiking boots") need "they"."""
        return "they" if self.noun.endswith("s") else "it"


INDUSTRIES: dict[str, tuple[Category, ...]] = {
    "kitchen appliances": (
        Category("blender", 40, 300, ("a 1,200 watt motor", "six speed settings", "a glass jug",
                 "a self-cleaning mode"), ("crushes ice easily", "is easy to clean", "makes smooth soups"),
                 ("is quite loud", "has a short power cord", "the lid is hard to remove")),
        Category("coffee maker", 30, 250, ("a built-in grinder", "a programmable timer", "a thermal carafe",
                 "a 12 cup capacity"), ("makes hot coffee quickly", "is simple to program",
                 "keeps coffee warm for hours"), ("is hard to descale", "drips when pouring",
                 "takes up a lot of counter space")),
        Category("toaster", 20, 120, ("four wide slots", "a bagel setting", "a defrost button",
                 "a removable crumb tray"), ("toasts evenly", "looks great on the counter", "is very fast"),
                 ("gets hot on the outside", "the buttons feel cheap", "is louder than expected")),
        Category("stand mixer", 150, 500, ("a 5 quart bowl", "ten speeds", "a dough hook",
                 "a tilt head design"), ("handles heavy dough", "is very sturdy", "comes with many attachments"),
                 ("is very heavy", "is expensive", "the bowl scratches easily")),
        Category("air fryer", 50, 200, ("a 6 quart basket", "a digital display", "eight cooking presets",
                 "a dishwasher safe basket"), ("makes crispy fries", "uses little oil", "heats up fast"),
                 ("the basket is small", "the coating wears off", "the fan is noisy")),
        Category("electric kettle", 20, 90, ("a 1.7 liter capacity", "temperature control",
                 "a keep warm function", "auto shut-off"), ("boils water in minutes", "is quiet", "pours well"),
                 ("the handle gets warm", "the lid is stiff", "has a plastic taste at first")),
    ),
    "outdoor gear": (
        Category("backpack", 50, 250, ("a 40 liter capacity", "a padded hip belt", "a rain cover",
                 "side water bottle pockets"), ("is comfortable on long hikes", "has lots of pockets",
                 "is very light"), ("the zippers are stiff", "runs small", "the straps slip")),
        Category("tent", 80, 500, ("room for two people", "a full rain fly", "aluminum poles",
                 "two doors"), ("sets up in minutes", "stays dry in heavy rain", "packs down small"),
                 ("is heavy to carry", "has little headroom", "the stakes bend easily")),
        Category("sleeping bag", 40, 300, ("a comfort rating of 20 degrees", "a down fill",
                 "a compression sack", "a hood"), ("is very warm", "packs small", "is soft and cozy"),
                 ("is narrow at the feet", "the zipper snags", "takes long to dry")),
        Category("hiking boots", 80, 250, ("a waterproof lining", "a grippy rubber sole",
                 "ankle support", "a padded collar"), ("need no breaking in", "have great grip",
                 "keep feet dry"), ("run narrow", "are heavy", "the laces come undone")),
        Category("camping stove", 30, 150, ("two burners", "a piezo igniter", "a wind shield",
                 "a folding design"), ("boils water fast", "is very stable", "is easy to light"),
                 ("uses a lot of fuel", "is bulky", "the flame is hard to adjust")),
        Category("headlamp", 15, 80, ("a 300 lumen beam", "a red light mode", "a rechargeable battery",
                 "a tilting head"), ("is bright", "is comfortable to wear", "the battery lasts long"),
                 ("the strap is thin", "the buttons are small", "is hard to charge")),
    ),
    "electronics": (
        Category("headphones", 50, 350, ("noise cancelling", "a 30 hour battery", "a foldable design",
                 "a built-in microphone"), ("sound clear and rich", "are comfortable for hours",
                 "block out noise well"), ("get warm on the ears", "the case is bulky", "the app is confusing")),
        Category("bluetooth speaker", 30, 200, ("a waterproof body", "a 12 hour battery",
                 "a built-in strap", "stereo pairing"), ("is loud for its size", "survives drops",
                 "has deep bass"), ("sounds thin at high volume", "charges slowly", "has no aux input")),
        Category("tablet", 100, 600, ("a 10 inch screen", "64 GB of storage", "a fast processor",
                 "a stylus"), ("has a sharp screen", "is fast", "the battery lasts all day"),
                 ("is slippery", "has weak speakers", "comes with no charger")),
        Category("smartwatch", 80, 400, ("a heart rate sensor", "built-in GPS", "a five day battery",
                 "sleep tracking"), ("is accurate", "looks elegant", "is easy to use"),
                 ("the band is stiff", "the screen scratches", "notifications are delayed")),
        Category("e-reader", 80, 250, ("a glare-free screen", "a warm front light", "a waterproof body",
                 "weeks of battery life"), ("is easy on the eyes", "is light", "holds thousands of books"),
                 ("the store is limited", "page turns are slow", "has no buttons")),
        Category("webcam", 30, 150, ("full HD video", "a privacy shutter", "autofocus",
                 "two microphones"), ("gives a sharp picture", "is easy to set up", "handles low light well"),
                 ("the clip is loose", "the cable is short", "the software is clunky")),
    ),
    "furniture": (
        Category("office chair", 90, 600, ("adjustable armrests", "lumbar support", "a mesh back",
                 "a five year warranty"), ("is comfortable all day", "is easy to adjust", "is very sturdy"),
                 ("took an hour to assemble", "squeaks a little", "the seat is firm")),
        Category("standing desk", 200, 800, ("an electric motor", "memory presets", "a bamboo top",
                 "a cable tray"), ("is stable at full height", "moves quietly", "looks great"),
                 ("is heavy to assemble", "wobbles slightly", "the controls are confusing")),
        Category("bookshelf", 60, 300, ("five shelves", "solid oak", "adjustable shelves",
                 "a wall anchor kit"), ("is solid", "looks expensive", "was easy to assemble"),
                 ("scratches easily", "the back panel is thin", "arrived with a dent")),
        Category("sofa", 400, 2000, ("three seats", "removable covers", "deep cushions", "oak legs"),
                 ("is very comfortable", "looks stylish", "is easy to clean"), ("is too soft",
                 "took weeks to arrive", "the cushions flatten")),
    ),
    "bicycles": (
        Category("road bike", 500, 3000, ("a carbon fork", "22 gears", "disc brakes", "an aluminum frame"),
                 ("is fast and light", "shifts smoothly", "handles well"), ("the saddle is hard",
                 "comes without pedals", "the tires puncture easily")),
        Category("mountain bike", 400, 2500, ("front suspension", "27.5 inch wheels",
                 "hydraulic disc brakes", "wide tires"), ("handles rough trails", "brakes well",
                 "feels solid"), ("is heavy", "the grips wear out", "the gears need tuning")),
        Category("electric bike", 900, 3500, ("a 250 watt motor", "a range of 50 miles",
                 "a removable battery", "five assist levels"), ("makes hills easy", "has a long range",
                 "is fun to ride"), ("is very heavy", "the battery is expensive", "the display is dim")),
        Category("bike helmet", 30, 200, ("ten air vents", "a rear light", "a magnetic buckle",
                 "an adjustable fit"), ("is light", "stays cool", "fits well"), ("looks bulky",
                 "the strap pinches", "runs large")),
    ),
    "tools": (
        Category("cordless drill", 60, 250, ("an 18 volt battery", "two speeds", "an LED light",
                 "a keyless chuck"), ("has plenty of power", "the battery lasts long", "is light"),
                 ("the case is flimsy", "the charger is slow", "the chuck slips")),
        Category("circular saw", 60, 220, ("a 7 inch blade", "a laser guide", "a dust port",
                 "bevel cuts up to 45 degrees"), ("cuts straight", "is powerful", "is easy to adjust"),
                 ("is loud", "throws a lot of dust", "the guard sticks")),
        Category("tool set", 40, 200, ("over 100 pieces", "a metal case", "a ratchet wrench",
                 "metric and imperial sockets"), ("covers most jobs", "is well organized", "feels solid"),
                 ("the case latches are weak", "the screwdrivers are soft", "is heavy")),
        Category("knife sharpener", 15, 120, ("three sharpening stages", "diamond plates",
                 "a non-slip base", "an angle guide"), ("makes knives razor sharp", "is easy to use",
                 "is compact"), ("removes a lot of metal", "is slow", "the base slides")),
        Category("ladder", 60, 300, ("a 6 foot height", "aluminum rails", "a tool tray",
                 "a folding design"), ("is stable", "is light", "folds flat"), ("wobbles at the top",
                 "the feet mark floors", "is hard to open")),
    ),
    "garden equipment": (
        Category("lawn mower", 150, 600, ("a 40 volt battery", "a 20 inch deck", "a grass bag",
                 "six height settings"), ("is quiet", "cuts evenly", "starts every time"),
                 ("the bag fills fast", "the battery runs out", "is hard to push uphill")),
        Category("garden hose", 20, 90, ("a 50 foot length", "a kink-free design", "brass fittings",
                 "a spray nozzle"), ("does not kink", "is light", "has strong pressure"),
                 ("leaks at the nozzle", "is stiff in cold weather", "fades in the sun")),
        Category("pruning shears", 15, 70, ("hardened steel blades", "a safety lock", "soft grips",
                 "a sap groove"), ("cut cleanly", "are comfortable", "stay sharp"),
                 ("the spring is weak", "the lock sticks", "are too large for small hands")),
        Category("compost bin", 40, 200, ("a 70 gallon capacity", "a rotating drum", "air vents",
                 "recycled plastic"), ("makes compost quickly", "keeps pests out", "is easy to turn"),
                 ("is hard to assemble", "the door is stiff", "smells in summer")),
        Category("raised garden bed", 50, 250, ("cedar boards", "a depth of 12 inches",
                 "no tools needed to build", "a weed barrier"), ("looks beautiful", "is easy to build",
                 "drains well"), ("the wood splits", "is smaller than it looks", "the corners bend")),
    ),
    "home appliances": (
        Category("vacuum cleaner", 80, 600, ("a cordless design", "a HEPA filter", "a 40 minute battery",
                 "a pet hair tool"), ("has strong suction", "is light", "empties easily"),
                 ("the bin is small", "is loud", "the battery fades")),
        Category("air purifier", 60, 400, ("a HEPA filter", "an air quality sensor", "a sleep mode",
                 "a room size of 400 square feet"), ("is very quiet", "clears smoke fast",
                 "helps with allergies"), ("filters are expensive", "the light is bright at night",
                 "is bulky")),
        Category("space heater", 30, 150, ("a ceramic element", "a tip-over switch", "a remote control",
                 "a thermostat"), ("heats a room quickly", "is quiet", "is safe"),
                 ("smells at first", "the remote is tiny", "uses a lot of power")),
        Category("desk lamp", 20, 120, ("dimmable LED light", "a USB port", "an adjustable arm",
                 "five color modes"), ("gives even light", "looks modern", "is easy to adjust"),
                 ("the base is light", "the touch controls are fussy", "flickers at low power")),
    ),
}
COMPANY_ROLES = (
    ("software engineer", 70, 120), ("warehouse associate", 28, 38), ("sales representative", 40, 65),
    ("customer service specialist", 32, 45), ("product designer", 60, 95), ("accountant", 50, 80),
    ("marketing coordinator", 42, 60), ("delivery driver", 30, 42), ("quality inspector", 38, 52),
    ("machine operator", 34, 48), ("data analyst", 55, 85), ("office manager", 45, 62),
)  # salary range in thousands of dollars per year

# Recipes: dish types with base ingredients, possible main ingredients and step templates.
# (quantity, unit-and-name) pairs; steps may refer to {main} and {extra}.
DISH_TYPES: dict[str, dict[str, Any]] = {
    "soup": {
        "mains": ("lentil", "tomato", "potato leek", "chicken noodle", "mushroom", "pumpkin", "pea",
                  "black bean", "carrot ginger", "onion"),
        "base": ("1 onion, chopped", "2 cloves garlic, minced", "4 cups vegetable stock",
                 "2 tablespoons olive oil", "1 teaspoon salt", "1 bay leaf", "2 carrots, diced",
                 "1 celery stalk, sliced"),
        "steps": (
            "Heat the oil in a large pot over medium heat and cook the onion until soft, about 5 minutes.",
            "Add the garlic and cook for one more minute, stirring [often|constantly|so it does not burn].",
            "Stir in the {main} and the rest of the vegetables.",
            "Pour in the stock, add the bay leaf and bring everything to a boil.",
            "Lower the heat and let it simmer for {minutes} minutes, until [everything is tender|the vegetables are soft].",
            "Remove the bay leaf and blend [half of the soup|the soup] until [smooth|creamy].",
            "Season with salt and pepper and serve [hot|warm] with [crusty bread|a green salad|grated cheese].",
        ),
        "time": (30, 60),
        "amounts": ("2 cups", "1 pound", "3 cups"),
    },
    "stew": {
        "mains": ("beef", "lamb", "chickpea", "pork and apple", "sausage and bean", "fish", "venison"),
        "base": ("1 large onion, diced", "3 cloves garlic", "2 potatoes, cubed", "3 carrots, sliced",
                 "1 can crushed tomatoes", "2 cups beef stock", "1 teaspoon dried thyme",
                 "2 tablespoons flour", "1 cup red wine"),
        "steps": (
            "Toss the {main} with the flour and a pinch of salt.",
            "Brown the {main} in batches in a heavy pot, then set it aside.",
            "Cook the onion and garlic in the same pot until golden.",
            "Pour in the wine and scrape up the brown bits from the bottom of the pot.",
            "Return the {main} to the pot with the tomatoes, stock, thyme and vegetables.",
            "Cover and cook on low heat for {minutes} minutes, stirring [now and then|every half hour].",
            "Taste, adjust the seasoning and serve with [mashed potatoes|rice|fresh bread].",
        ),
        "time": (90, 180),
        "amounts": ("2 pounds", "1 1/2 pounds", "3 pounds"),
    },
    "salad": {
        "mains": ("chicken", "quinoa", "tuna", "beet and goat cheese", "potato", "couscous", "lentil",
                  "grilled vegetable", "egg"),
        "base": ("4 cups mixed greens", "1 cucumber, sliced", "1 cup cherry tomatoes", "1/4 red onion",
                 "3 tablespoons olive oil", "1 tablespoon lemon juice", "1 teaspoon mustard",
                 "1/2 cup feta cheese"),
        "steps": (
            "Prepare the {main} and let it cool [completely|to room temperature].",
            "Whisk the oil, lemon juice and mustard with a pinch of salt to make the dressing.",
            "Slice the cucumber, halve the tomatoes and cut the onion very thin.",
            "Put the greens in a large bowl and add the vegetables and the {main}.",
            "Pour the dressing over the salad and toss gently.",
            "Top with the cheese and serve [right away|within the hour].",
        ),
        "time": (15, 40),
        "amounts": ("2 cups", "1 cup", "1 pound"),
    },
    "pie": {
        "mains": ("apple", "cherry", "blueberry", "pumpkin", "pecan", "lemon", "rhubarb", "peach",
                  "chicken pot", "steak and mushroom"),
        "base": ("2 1/2 cups flour", "1 cup cold butter", "1/2 teaspoon salt", "6 tablespoons ice water",
                 "3/4 cup sugar", "1 egg, beaten", "1 teaspoon cinnamon"),
        "steps": (
            "Mix the flour and salt, then cut in the cold butter until it looks like coarse crumbs.",
            "Add the ice water a little at a time and press the dough into two discs.",
            "Chill the dough for at least 30 minutes.",
            "Prepare the {main} filling and mix it with the sugar and cinnamon.",
            "Roll out one disc, line the pie dish and add the filling.",
            "Cover with the second disc, seal the edges and brush the top with the egg.",
            "Bake at 375 degrees for {minutes} minutes, until the crust is [golden|golden brown].",
            "Let the pie cool for [an hour|two hours] before slicing.",
        ),
        "time": (50, 75),
        "amounts": ("3 cups", "4 cups", "2 cups"),
    },
    "curry": {
        "mains": ("chicken", "chickpea", "shrimp", "vegetable", "lamb", "lentil", "tofu", "sweet potato"),
        "base": ("1 onion, chopped", "3 cloves garlic", "1 tablespoon fresh ginger", "2 tablespoons curry paste",
                 "1 can coconut milk", "1 can diced tomatoes", "1 teaspoon turmeric", "1 handful cilantro"),
        "steps": (
            "Cook the onion in a little oil until soft and golden.",
            "Add the garlic, ginger, curry paste and turmeric and stir for one minute until fragrant.",
            "Add the {main} and stir to coat it in the spices.",
            "Pour in the tomatoes and coconut milk and bring to a gentle simmer.",
            "Cook for {minutes} minutes, until the sauce thickens.",
            "Finish with the cilantro and serve with [rice|warm flatbread|naan].",
        ),
        "time": (30, 60),
        "amounts": ("1 pound", "2 pounds", "3 cups"),
    },
    "pasta": {
        "mains": ("tomato basil", "mushroom", "spinach and ricotta", "sausage", "lemon garlic", "pesto",
                  "seafood", "roasted pepper"),
        "base": ("1 pound spaghetti", "3 tablespoons olive oil", "4 cloves garlic, sliced",
                 "1/2 cup parmesan cheese", "1 pinch red pepper flakes", "1 handful fresh basil",
                 "1 teaspoon salt"),
        "steps": (
            "Bring a large pot of salted water to a boil and cook the pasta until al dente.",
            "While the pasta cooks, warm the oil in a wide pan and add the garlic and pepper flakes.",
            "Add the {main} and cook for {minutes} minutes.",
            "Save a cup of the pasta water, then drain the pasta.",
            "Toss the pasta with the sauce, adding a splash of pasta water to loosen it.",
            "Serve with the parmesan and fresh basil on top.",
        ),
        "time": (20, 40),
        "amounts": ("2 cups", "1 pound", "3 cups"),
    },
    "bread": {
        "mains": ("sourdough", "whole wheat", "rye", "olive", "banana", "cornbread", "oat", "cinnamon raisin"),
        "base": ("4 cups bread flour", "1 1/2 cups warm water", "2 teaspoons salt", "1 packet dry yeast",
                 "1 tablespoon honey", "2 tablespoons butter"),
        "steps": (
            "Dissolve the yeast and honey in the warm water and let it stand until foamy.",
            "Mix in the flour and salt to form a shaggy dough.",
            "Knead for 10 minutes, until the dough is smooth and elastic.",
            "Let it rise in a warm place for [one hour|an hour and a half|two hours], until doubled in size.",
            "Shape the {main} loaf and place it in a greased pan.",
            "Bake at 425 degrees for {minutes} minutes, until the loaf sounds hollow when tapped.",
            "Cool on a rack before slicing.",
        ),
        "time": (30, 50),
        "amounts": ("1 cup", "1/2 cup", "2 cups"),
    },
    "cake": {
        "mains": ("chocolate", "carrot", "lemon", "vanilla", "coffee", "honey", "almond", "coconut"),
        "base": ("2 cups flour", "1 1/2 cups sugar", "3 eggs", "1 cup butter, softened", "1 cup milk",
                 "2 teaspoons baking powder", "1 teaspoon vanilla extract"),
        "steps": (
            "Preheat the oven to 350 degrees and grease two round cake pans.",
            "Beat the butter and sugar until light and fluffy.",
            "Add the eggs one at a time, then the vanilla and the {main}.",
            "Fold in the flour and baking powder, alternating with the milk.",
            "Divide the batter between the pans and bake for {minutes} minutes.",
            "Let the cakes cool completely before adding the frosting.",
        ),
        "time": (25, 45),
        "amounts": ("1/2 cup", "1 cup", "3 tablespoons"),
    },
    "tacos": {
        "mains": ("fish", "chicken", "pork", "black bean", "beef", "shrimp", "mushroom"),
        "base": ("12 small corn tortillas", "1 cup shredded cabbage", "1 avocado", "1 lime",
                 "1/2 cup sour cream", "1 teaspoon cumin", "1 teaspoon chili powder", "1 handful cilantro"),
        "steps": (
            "Season the {main} with the cumin, chili powder and a pinch of salt.",
            "Cook the {main} in a hot pan for {minutes} minutes, until nicely browned.",
            "Warm the tortillas in a dry pan or wrapped in a towel in the oven.",
            "Slice the avocado and cut the lime into wedges.",
            "Fill each tortilla with the {main}, cabbage and avocado.",
            "Top with sour cream and cilantro and serve with the lime wedges.",
        ),
        "time": (15, 30),
        "amounts": ("1 pound", "1 1/2 pounds", "2 pounds"),
    },
    "roast": {
        "mains": ("chicken", "pork loin", "beef", "leg of lamb", "turkey", "root vegetable", "salmon"),
        "base": ("2 pounds potatoes", "4 carrots", "1 head of garlic", "3 sprigs rosemary",
                 "3 tablespoons olive oil", "1 lemon", "1 teaspoon sea salt", "1 teaspoon black pepper"),
        "steps": (
            "Take the {main} out of the fridge 30 minutes before cooking.",
            "Rub it all over with oil, salt, pepper and the chopped rosemary.",
            "Arrange the potatoes, carrots and garlic in a roasting pan and place the {main} on top.",
            "Roast at 400 degrees for {minutes} minutes, basting [once or twice|every 20 minutes].",
            "Squeeze the lemon over everything at the end.",
            "Let the {main} rest for 10 minutes before carving.",
        ),
        "time": (45, 120),
        "amounts": ("3 pounds", "2 pounds", "4 pounds"),
    },
}
RECIPE_FLAVORS = ("smoky", "spicy", "creamy", "lemony", "garlicky", "honey glazed", "herbed", "rustic",
                  "classic", "hearty", "easy", "summer", "winter", "golden")  # fmt: skip
CUISINES: dict[str, tuple[str, ...]] = {
    "Italian": ("wild mushroom risotto", "lasagna", "wood-fired pizza", "veal with lemon", "tiramisu"),
    "Mexican": ("mole chicken", "fish tacos", "pork tamales", "chili relleno", "churros"),
    "Thai": ("green curry", "pad thai", "papaya salad", "tom yum soup", "mango sticky rice"),
    "French": ("duck confit", "onion soup", "beef bourguignon", "crepes", "lemon tart"),
    "Indian": ("butter chicken", "lamb biryani", "saag paneer", "dal makhani", "garlic naan"),
    "Greek": ("moussaka", "lamb souvlaki", "spanakopita", "grilled octopus", "baklava"),
    "Japanese": ("ramen", "sushi platter", "chicken katsu", "miso black cod", "tempura"),
    "American": ("smash burgers", "fried chicken", "mac and cheese", "pulled pork", "apple pie"),
    "seafood": ("clam chowder", "grilled salmon", "fish and chips", "lobster rolls", "crab cakes"),
    "vegetarian": ("lentil shepherd's pie", "mushroom burger", "roasted vegetable bowl", "falafel wrap",
                   "stuffed peppers"),
    "barbecue": ("smoked brisket", "pork ribs", "pulled chicken", "burnt ends", "cornbread"),
    "Spanish": ("seafood paella", "patatas bravas", "garlic shrimp", "chorizo croquettes", "flan"),
}
RESTAURANT_WORDS = ("Kitchen", "Bistro", "Grill", "Cafe", "Diner", "Tavern", "Table", "Eatery", "House")
RESTAURANT_ADJS = ("Copper", "Blue Door", "Golden", "Little", "Old Mill", "Red Barn", "Salt and Pepper",
                   "Silver Spoon", "Corner", "Green Olive", "Lantern", "Harvest")  # fmt: skip
FORUM_ADJS = ("quiet", "happy", "lazy", "brave", "sunny", "rusty", "clever", "cosmic", "wild", "old",
              "tiny", "grumpy", "lucky", "misty", "urban", "coastal")  # fmt: skip
FORUM_NOUNS = ("fox", "owl", "hiker", "baker", "biker", "gardener", "reader", "tinker", "otter", "traveler",
               "cook", "dad", "mom", "builder", "camper", "rider")  # fmt: skip
PLAYER_POSITIONS = ("goalkeeper", "defender", "midfielder", "striker")
HOUSE_FEATURES = (
    "a renovated kitchen with granite counters", "hardwood floors throughout", "a large fenced backyard",
    "a two car garage", "a finished basement", "a wood burning fireplace", "new windows and a new roof",
    "a covered front porch", "a sunny deck off the kitchen", "central air conditioning",
    "a walk-in closet in the main bedroom", "solar panels", "a vegetable garden and fruit trees",
    "views of the {river} River", "an open floor plan", "a home office with built-in shelves",
)  # fmt: skip
RECIPE_SITES = ("www.homecookingdaily.com", "www.thefamilytable.com", "www.simplysavory.net",
                "www.kitchenstories-blog.com", "www.weeknightplates.com", "www.flourandthyme.com")
REVIEW_SITES = ("www.gearcheckreviews.com", "www.honesttestlab.com", "www.thereviewdesk.com",
                "www.buyersnotebook.net", "www.everydaygearguide.com")
TRAVEL_SITES = ("www.wanderingweekends.com", "www.slowroadtravel.com", "www.smalltownescapes.com",
                "www.ourlittleroadtrip.net", "www.thecuriouscompass.com")
HOWTO_SITES = ("www.handyhowto.com", "www.learnitathome.com", "www.thepracticalguide.net", "www.diyweekend.com")
HOUSE_STYLES = ("ranch", "colonial", "Victorian", "craftsman", "cottage", "farmhouse", "townhouse", "bungalow")

HOW_TO_TASKS: tuple[tuple[str, str | None, tuple[str, ...], tuple[str, ...]], ...] = (
    # (task, product category used, steps, tips)
    ("clean a cast iron pan", None, (
        "Let the pan cool until it is warm but safe to touch.",
        "Rinse it with hot water and scrub off food with a stiff brush [or a plastic scraper|or coarse salt].",
        "Avoid soaking the pan, because standing water causes rust.",
        "Dry the pan completely with a towel, then set it on low heat for a few minutes.",
        "Rub a thin layer of oil over the inside with a paper towel.",
        "Store it in a dry place [with the lid off|with a paper towel inside].",
    ), ("A little dish soap will not hurt a well seasoned pan.", "If rust appears, scrub it off and season the pan again.")),
    ("plant tomatoes in a small garden", "raised garden bed", (
        "Choose a spot that gets at least six hours of sun a day.",
        "Mix compost into the soil [a week before planting|before you plant].",
        "Dig a hole deep enough to bury two thirds of the stem.",
        "Set the plant in the hole, fill it with soil and press down gently.",
        "Water deeply at the base of the plant, not on the leaves.",
        "Add a stake or cage so the plant has support as it grows.",
    ), ("Water in the morning so the leaves dry during the day.", "Pinch off the small shoots that grow between the stem and the branches.")),
    ("fix a flat bicycle tire", "bike helmet", (
        "Remove the wheel from the bike [after opening the brake|after shifting to the smallest gear].",
        "Use tire levers to pry one side of the tire off the rim.",
        "Pull out the inner tube and find the hole by pumping it up and listening for air.",
        "Check the inside of the tire for glass or thorns [and remove them|so the new tube does not puncture].",
        "Put in a new tube or patch the old one.",
        "Push the tire back onto the rim, inflate it and put the wheel back on the bike.",
    ), ("Carry a spare tube and a small pump on long rides.", "Check your tire pressure once a week.")),
    ("brew coffee with a French press", "electric kettle", (
        "Heat water to just below boiling.",
        "Grind the beans [coarsely|to a coarse grind], about one tablespoon per cup of water.",
        "Add the coffee to the press and pour in a little water to let it bloom for 30 seconds.",
        "Pour in the rest of the water and stir gently.",
        "Put the lid on and wait four minutes.",
        "Press the plunger down slowly and pour the coffee right away.",
    ), ("Fresh beans make the biggest difference.", "Do not leave coffee in the press, or it will turn bitter.")),
    ("paint a small room", "ladder", (
        "Move the furniture to the middle of the room and cover it with sheets.",
        "Fill holes in the walls and sand them smooth.",
        "Tape the edges of the ceiling, windows and trim.",
        "Apply a coat of primer [if the walls are dark|on patched areas].",
        "Cut in along the edges with a brush, then roll paint onto the walls in a W pattern.",
        "Let the first coat dry for [four hours|a few hours], then apply a second coat.",
    ), ("Buy a little more paint than you think you need.", "Remove the tape while the paint is still slightly wet.")),
    ("start a compost pile", "compost bin", (
        "Pick a shady corner of the garden with good drainage.",
        "Start with a layer of twigs or straw at the bottom to let air in.",
        "Add green material such as fruit scraps, coffee grounds and grass clippings.",
        "Cover it with brown material such as dry leaves or shredded paper.",
        "Keep the pile as damp as a wrung out sponge.",
        "Turn the pile every week or two [with a garden fork|to add air].",
    ), ("Do not add meat or dairy, which attract pests.", "Finished compost is dark and smells like earth.")),
    ("fix a leaky faucet", "tool set", (
        "Turn off the water supply under the sink.",
        "Plug the drain so small parts do not fall in.",
        "Remove the handle [with a screwdriver|by loosening the set screw].",
        "Unscrew the cartridge or valve and take it to the hardware store to find a match.",
        "Replace the worn washer or O-ring.",
        "Put everything back together and turn the water on slowly.",
    ), ("Take photos as you take the faucet apart.", "A drip of one drop per second wastes over 3,000 gallons a year.")),
    ("sharpen a kitchen knife", "knife sharpener", (
        "Soak the whetstone in water for about ten minutes.",
        "Hold the knife at an angle of about 20 degrees to the stone.",
        "Push the blade across the stone from heel to tip, [ten times|about a dozen times] on each side.",
        "Switch to the fine side of the stone and repeat with lighter pressure.",
        "Wipe the blade clean and test it on a sheet of paper.",
    ), ("Hone the knife every few uses to keep the edge straight.", "Never put good knives in the dishwasher.")),
    ("pack for a weekend hiking trip", "backpack", (
        "Check the weather forecast and the trail conditions before you go.",
        "Pack layers: a base layer, a warm fleece and a rain jacket.",
        "Bring more water than you think you need and a way to purify more.",
        "Pack simple meals and snacks such as nuts, dried fruit and oatmeal.",
        "Add a first aid kit, a map and a headlamp.",
        "Put heavy items close to your back and near the middle of the pack.",
    ), ("Tell someone where you are going and when you will be back.", "Break in new boots before the trip.")),
    ("care for a houseplant", None, (
        "Find out how much light your plant needs and place it near the right window.",
        "Water only when the top inch of soil feels dry.",
        "Make sure the pot has a drainage hole.",
        "Wipe the leaves with a damp cloth every few weeks.",
        "Feed the plant with a liquid fertilizer once a month in spring and summer.",
        "Repot it into a slightly larger pot when roots grow out of the bottom.",
    ), ("Yellow leaves often mean too much water.", "Most houseplants prefer the same temperature that people do.")),
    ("hang a shelf on a wall", "cordless drill", (
        "Use a stud finder to locate the studs in the wall.",
        "Hold the shelf in place and mark the holes with a pencil, using a level to keep it straight.",
        "Drill pilot holes at the marks.",
        "Use wall anchors where there is no stud behind the wall.",
        "Screw the brackets to the wall and set the shelf on top.",
    ), ("Measure twice and drill once.", "Heavy books need brackets screwed into studs.")),
    ("save money on groceries", None, (
        "Plan your meals for the week before you go shopping.",
        "Write a list and stick to it.",
        "Buy store brands, which are often made in the same factories as big brands.",
        "Shop for fruit and vegetables that are in season.",
        "Cook large batches and freeze the leftovers.",
        "Compare the price per pound or per ounce instead of the price on the package.",
    ), ("Never shop when you are hungry.", "Check what is already in your fridge before you leave.")),
    ("train a puppy to sit", None, (
        "Hold a small treat close to the nose of your puppy.",
        "Move your hand up, so the head follows the treat and the bottom goes down.",
        "As soon as the puppy sits, say the word sit and give the treat.",
        "Repeat this a few times [every day|several times a day] in short sessions.",
        "Slowly stop using the treat and reward with praise instead.",
    ), ("Keep sessions to five minutes so your puppy stays interested.", "Be patient and never punish mistakes.")),
    ("set up a home office", "office chair", (
        "Pick a quiet corner with natural light if you can.",
        "Set the top of your screen at eye level, about an arm's length away.",
        "Adjust your chair so your feet rest flat on the floor.",
        "Keep cables tidy with clips or a cable tray.",
        "Add a lamp for evening work to reduce eye strain.",
    ), ("Stand up and stretch once an hour.", "Keep work things out of sight at the end of the day.")),
    ("prepare your car for winter", None, (
        "Check the battery, since cold weather is hard on old batteries.",
        "Replace worn wiper blades and fill up on winter washer fluid.",
        "Check the tire tread and consider winter tires.",
        "Test the heater and the defroster.",
        "Keep a blanket, a flashlight, a scraper and some snacks in the trunk.",
    ), ("Keep the gas tank at least half full in winter.", "Wash off road salt every few weeks.")),
    ("make a smoothie", "blender", (
        "Add a cup of liquid such as milk, juice or water to the blender first.",
        "Add a banana or half an avocado for a creamy texture.",
        "Add a cup of frozen fruit, such as berries or mango.",
        "Add a handful of spinach if you want some greens.",
        "Blend on high for about a minute, until smooth.",
    ), ("Freeze ripe bananas in slices so they are ready to use.", "Add ice only at the end if it is too thick.")),
)


# ---------------------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Person:
    first: str
    last: str
    female: bool
    birth_year: int
    job: str
    hometown: str
    employer: str | None = None
    spouse: str | None = None  # full name of the spouse, also a Person of the world
    hobby: str = ""

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"

    @property
    def he(self) -> str:
        return "she" if self.female else "he"

    @property
    def his(self) -> str:
        return "her" if self.female else "his"

    @property
    def him(self) -> str:
        return "her" if self.female else "him"

    def age_in(self, year: int) -> int:
        return year - self.birth_year


@dataclass
class Region:
    name: str
    climate: str
    industry: str
    rivers: list[str] = field(default_factory=list)
    capital: str = ""
    league: str = ""


@dataclass
class Town:
    name: str
    region: str
    population: int
    river: str
    founded: int
    industry: str
    x: int  # map coordinates in miles, used for consistent distances between towns
    y: int
    council_size: int
    price_per_sqft: int
    landmarks: list[tuple[str, str]] = field(default_factory=list)  # (name, kind)
    mayor: str = ""
    newspaper: str = ""
    newspaper_domain: str = ""
    reporters: list[str] = field(default_factory=list)
    school: str = ""
    principal: str = ""
    team: str = ""
    festival: str = ""
    hotels: list[str] = field(default_factory=list)
    restaurants: list[str] = field(default_factory=list)
    residents: list[str] = field(default_factory=list)
    council: list[str] = field(default_factory=list)
    agent: str = ""


@dataclass
class Company:
    name: str
    industry: str
    hq: str
    founded: int
    founder: str
    ceo: str
    employees: int
    domain: str
    products: list[str] = field(default_factory=list)
    staff: list[str] = field(default_factory=list)
    ceo_since: int = 0


@dataclass
class Product:
    name: str  # "Northwind Atlas 2"
    category: Category
    maker: str
    price: float
    features: tuple[str, ...]
    quality: int  # 1..5, the "true" rating reviews gravitate to
    launch_year: int

    @property
    def full(self) -> str:
        return f"{self.name} {self.category.noun}"


@dataclass
class Recipe:
    name: str
    dish_type: str
    main: str
    ingredients: list[str]
    servings: int
    minutes: int
    author: str


@dataclass
class Restaurant:
    name: str
    town: str
    cuisine: str
    owner: str
    signature: str
    entree_price: int
    opened: int
    stars: int  # 2..5


@dataclass
class Team:
    name: str
    town: str
    coach: str
    stadium: str
    capacity: int
    colors: str
    founded: int
    strength: float
    players: list[tuple[str, str]] = field(default_factory=list)  # (person name, position)


@dataclass
class Festival:
    name: str
    town: str
    month: int
    activities: str
    organizer: str
    ticket: int  # dollars, 0 means free
    first_year: int
    venue: str


@dataclass
class Hotel:
    name: str
    town: str
    nightly: int
    stars: int
    rooms: int


@dataclass
class World:
    """All facts documents draw on; built deterministically from a seed by :func:`build_world`."""

    seed: int
    regions: dict[str, Region]
    towns: dict[str, Town]
    people: dict[str, Person]
    companies: dict[str, Company]
    products: dict[str, Product]
    recipes: dict[str, Recipe]
    restaurants: dict[str, Restaurant]
    teams: dict[str, Team]
    festivals: dict[str, Festival]
    hotels: dict[str, Hotel]
    elders: list[Person]  # people who appear only in obituaries
    authors: dict[str, str]  # website domain -> the person who writes it
    analysts: list[str]

    def distance(self, a: str, b: str) -> int:
        ta, tb = self.towns[a], self.towns[b]
        # Integer square root, not math.hypot: libm results may differ in the last bit between machines.
        d2 = (ta.x - tb.x) ** 2 + (ta.y - tb.y) ** 2
        r = math.isqrt(d2)
        return r + 1 if d2 - r * r > r else r  # round to nearest


class _NamePool:
    """Hands out unique full names, so a name always identifies one person."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def new(self, female: bool | None = None) -> tuple[str, str, bool]:
        while True:
            is_f = self.rng.random() < 0.5 if female is None else female
            first = self.rng.choice(FEMALE_NAMES if is_f else MALE_NAMES)
            last = self.rng.choice(LAST_NAMES)
            # First name equal to last name ("Scott Scott") reads like a bug, so it is skipped.
            if first != last and f"{first} {last}" not in self.used:
                self.used.add(f"{first} {last}")
                return first, last, is_f


def build_world(seed: int = DEFAULT_SEED) -> World:
    """Build the fictional world for ``seed``; the same seed always gives the same world."""
    rng = random.Random(derive_seed(seed, "world"))
    names = _NamePool(rng)
    people: dict[str, Person] = {}

    def person(job: str, hometown: str, born: tuple[int, int] = (1950, 1998), employer: str | None = None,
               female: bool | None = None) -> Person:
        first, last, is_f = names.new(female)
        p = Person(first, last, is_f, rng.randint(*born), job, hometown, employer, hobby=rng.choice(HOBBIES))
        people[p.name] = p
        return p

    # Regions, rivers and towns.
    river_names = list(RIVER_NAMES)
    rng.shuffle(river_names)
    regions: dict[str, Region] = {}
    for i, (rname, climate, industry) in enumerate(REGIONS):
        regions[rname] = Region(rname, climate, industry, rivers=river_names[2 * i : 2 * i + 2])
    town_names = sorted({p + s for p in TOWN_PREFIXES for s in TOWN_SUFFIXES} - {r[0] for r in REGIONS})
    rng.shuffle(town_names)
    towns: dict[str, Town] = {}
    region_list = list(regions.values())
    for i, tname in enumerate(town_names[:64]):
        region = region_list[i % len(region_list)]
        ri = region_list.index(region)
        # Regions sit on a 4x2 grid of 120-mile cells, towns scattered inside their region's cell.
        x = (ri % 4) * 120 + rng.randint(5, 115)
        y = (ri // 4) * 120 + rng.randint(5, 115)
        # Roughly log-uniform sizes from integer arithmetic only (generation must not depend on libm).
        scale = rng.choice((25, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300, 400, 500, 650, 800, 1000, 1300,
                            1600, 2000, 2500))
        pop = scale * 100 + rng.randint(-9, 9) * (10 if scale < 100 else 100)
        towns[tname] = Town(
            name=tname, region=region.name, population=pop, river=rng.choice(region.rivers),
            founded=rng.randint(1760, 1910), industry=rng.choice(TOWN_INDUSTRIES), x=x, y=y,
            council_size=rng.choice((5, 7, 9)), price_per_sqft=rng.randint(90, 420),
        )
    for region in region_list:
        members = [t for t in towns.values() if t.region == region.name]
        region.capital = max(members, key=lambda t: t.population).name
        region.league = f"{region.name} Football League"

    # Per-town institutions and people.
    for town in towns.values():
        for pattern, kind in rng.sample(LANDMARKS, 3):
            town.landmarks.append((pattern.format(town=town.name, river=town.river, last=rng.choice(LAST_NAMES),
                                                  first=rng.choice(FEMALE_NAMES + MALE_NAMES)), kind))
        town.mayor = person("mayor", town.name, born=(1950, 1980)).name
        paper_word = rng.choice(NEWSPAPER_WORDS)
        town.newspaper = f"The {town.name} {paper_word}"
        town.newspaper_domain = f"www.{town.name.lower()}{paper_word.lower()}.com"
        town.reporters = [person("reporter", town.name, born=(1965, 1996)).name for _ in range(2)]
        town.school = f"{town.name} High School"
        town.principal = person("school principal", town.name, born=(1955, 1985)).name
        town.agent = person("real estate agent", town.name, born=(1960, 1992)).name
        town.residents = [person(rng.choice(COMMON_JOBS), town.name).name for _ in range(6)]
        town.council = [person("town council member", town.name, born=(1950, 1990)).name
                        for _ in range(town.council_size - 1)]

    # Married couples among residents of the same town, so spouses are consistent facts too.
    for town in towns.values():
        singles = [people[n] for n in [*town.residents, town.mayor, town.principal]]
        rng.shuffle(singles)
        for a, b in zip(singles[0::2], singles[1::2], strict=False):
            if a.female != b.female and rng.random() < 0.7:
                a.spouse, b.spouse = b.name, a.name

    # Companies and products.
    companies: dict[str, Company] = {}
    products: dict[str, Product] = {}
    brand_names = sorted({p + s for p in COMPANY_PREFIXES for s in COMPANY_SUFFIXES})
    rng.shuffle(brand_names)
    industries = list(INDUSTRIES)
    town_list = list(towns.values())
    for i, brand in enumerate(brand_names[:48]):
        industry = industries[i % len(industries)]
        hq = rng.choice(town_list).name
        founded = rng.randint(1890, 2012)
        founder = person("entrepreneur", hq, born=(founded - 45, founded - 22))
        ceo = person("chief executive", hq, born=(1955, 1985))
        domain = f"www.{brand.lower()}.com"
        company = Company(brand, industry, hq, founded, founder.name, ceo.name, rng.choice(
            (40, 85, 120, 250, 400, 900, 1500, 3200)), domain, ceo_since=rng.randint(max(founded, ceo.birth_year + 30),
                                                                          2016))
        models = rng.sample(MODEL_WORDS, 4)
        for category, model in zip(rng.sample(INDUSTRIES[industry], 3), models, strict=False):
            name = f"{brand} {model}{rng.choice(MODEL_SUFFIXES)}"
            price = rng.randint(category.low, category.high)
            price = price - 0.01 if price < 400 and rng.random() < 0.6 else float(round(price, -1))
            products[name] = Product(name, category, brand, price, tuple(rng.sample(category.features, 3)),
                                     quality=rng.choice((2, 3, 3, 4, 4, 4, 5, 5)),
                                     launch_year=rng.randint(max(founded, 2008), 2018))
            company.products.append(name)
        companies[brand] = company

    # Restaurants, recipes (written by restaurant chefs), teams, festivals and hotels.
    restaurants: dict[str, Restaurant] = {}
    recipes: dict[str, Recipe] = {}
    for town in town_list:
        for _ in range(rng.choice((1, 2, 2))):
            cuisine = rng.choice(sorted(CUISINES))
            chef = person("chef", town.name, born=(1958, 1994))
            rname = rng.choice((f"The {rng.choice(RESTAURANT_ADJS)} {rng.choice(RESTAURANT_WORDS)}",
                                f"{chef.last}'s {rng.choice(RESTAURANT_WORDS)}",
                                f"{rng.choice(RESTAURANT_ADJS)} {rng.choice(RESTAURANT_WORDS)}"))
            while rname in restaurants:  # names identify restaurants, so they must be unique
                rname = f"{rname} {town.name}" if town.name not in rname else f"{rname} {rng.randint(2, 9)}"
            restaurants[rname] = Restaurant(rname, town.name, cuisine, chef.name, rng.choice(CUISINES[cuisine]),
                                            rng.randint(12, 45), rng.randint(1985, 2017), rng.randint(2, 5))
            town.restaurants.append(rname)
            chef.employer = rname
    chefs = [people[r.owner] for r in restaurants.values()]
    for dish_type in sorted(DISH_TYPES):
        spec = DISH_TYPES[dish_type]
        for main in spec["mains"]:
            flavor = rng.choice((*RECIPE_FLAVORS, rng.choice(town_list).name + "-style"))
            name = f"{flavor} {main} {dish_type}"
            # All base ingredients (the steps mention them), in a per-recipe order.
            base = rng.sample(spec["base"], len(spec["base"]))
            amount = rng.choice(spec["amounts"])
            ingredients = [f"{amount} {main}", *base]
            lo, hi = spec["time"]
            recipes[name] = Recipe(name, dish_type, main, ingredients, rng.choice((2, 4, 4, 6, 8)),
                                   5 * rng.randint(lo // 5, hi // 5), rng.choice(chefs).name)

    teams: dict[str, Team] = {}
    festivals: dict[str, Festival] = {}
    hotels: dict[str, Hotel] = {}
    for town in town_list:
        mascot = rng.choice(TEAM_MASCOTS)
        coach = person("football coach", town.name, born=(1955, 1985), female=False)
        stadium_first = rng.choice([town.name, rng.choice(LAST_NAMES), "Riverside", "Memorial"])
        stadium = f"{stadium_first} {rng.choice(STADIUM_WORDS)}"
        tname = f"{town.name} {mascot}"
        team = Team(tname, town.name, coach.name, stadium, rng.choice((4000, 6500, 8000, 12000, 18000, 25000)),
                    rng.choice(TEAM_COLORS), rng.randint(1880, 1975), round(rng.random(), 3))
        for position in PLAYER_POSITIONS:
            team.players.append((person(f"{position} for the {tname}", town.name, born=(1988, 2000),
                                        female=False).name, position))
        team.players.append((person(f"striker for the {tname}", town.name, born=(1990, 2000),
                                    female=False).name, "striker"))
        teams[tname] = team
        town.team = tname
        coach.employer = tname
        theme, activities = rng.choice(FESTIVAL_THEMES)
        fname = f"{town.name} {theme} Festival"
        festivals[fname] = Festival(fname, town.name, rng.randint(1, 12) if theme != "Winter Lights" else 12,
                                    activities, person("festival organizer", town.name).name,
                                    rng.choice((0, 0, 5, 10, 12, 15, 20, 25)), rng.randint(1950, 2010),
                                    rng.choice(town.landmarks)[0])
        town.festival = fname
        for _ in range(rng.choice((1, 2))):
            hname = f"{rng.choice(HOTEL_PREFIXES)} {rng.choice(HOTEL_WORDS)}"
            if any(h.startswith(hname) for h in town.hotels):
                continue
            stars = rng.randint(2, 5)
            key = f"{hname}, {town.name}"
            hotels[key] = Hotel(hname, town.name, 40 + 35 * stars + rng.randint(0, 40), stars, rng.randint(8, 180))
            town.hotels.append(key)

    # Company staff, so that job postings and company news can quote employees.
    for company in companies.values():
        for _ in range(2):
            role, _, _ = rng.choice(COMPANY_ROLES)
            company.staff.append(person(role, company.hq, employer=company.name).name)
    authors = {}
    for site, job in [*((s, "food blogger") for s in RECIPE_SITES), *((s, "product reviewer") for s in REVIEW_SITES),
                      *((s, "travel writer") for s in TRAVEL_SITES), *((s, "handyman") for s in HOWTO_SITES)]:
        authors[site] = person(job, rng.choice(town_list).name, born=(1960, 1995)).name
    banks = ("Harbor Securities", "Crown Capital", "Northgate Research", "Summit Partners")
    analysts = [person("market analyst", rng.choice(town_list).name, born=(1965, 1992), employer=bank).name
                for bank in banks]

    elders = []
    for _ in range(160):
        first, last, is_f = names.new()
        elders.append(Person(first, last, is_f, rng.randint(1921, 1948), rng.choice(COMMON_JOBS[:-6]),
                             rng.choice(town_list).name, hobby=rng.choice(HOBBIES)))
    return World(seed, regions, towns, people, companies, products, recipes, restaurants, teams, festivals,
                 hotels, elders, authors, analysts)


# ---------------------------------------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Doc:
    title: str
    paragraphs: list[str]
    url: str
    when: dt.datetime
    town: str | None = None  # the town a news story is about, so follow-up stories stay on its paper


class _Writer:
    """Per-document helper: the RNG, the world, the document's date and sentence utilities."""

    def __init__(self, rng: random.Random, world: World, focus_town: str | None = None) -> None:
        self.rng = rng
        self.w = world
        self.focus_town = focus_town  # set for follow-up stories on one newspaper's page
        day = _FIRST_DAY + dt.timedelta(days=rng.randrange((_LAST_DAY - _FIRST_DAY).days + 1))
        self.when = dt.datetime(day.year, day.month, day.day, rng.randrange(24), rng.randrange(60),
                                rng.randrange(60))
        self.today = day

    # -- randomness -------------------------------------------------------------------------------------
    def x(self, template: str, **slots: Any) -> str:
        """A sentence: expanded and capitalised."""
        return expand(self.rng, template, slots)

    def f(self, template: str, **slots: Any) -> str:
        """A fragment for use inside another sentence: expanded, case left alone."""
        return expand(self.rng, template, slots, capitalize=False)

    def pick(self, seq: Sequence[Any]) -> Any:
        return self.rng.choice(seq)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def sample(self, seq: Sequence[Any], k: int) -> list[Any]:
        return self.rng.sample(list(seq), min(k, len(seq)))

    def some(self, templates: Sequence[str], lo: int, hi: int, **slots: Any) -> list[str]:
        """Between lo and hi of the templates, in their original order (keeps the discourse coherent)."""
        k = self.rng.randint(min(lo, len(templates)), min(hi, len(templates)))
        idx = sorted(self.rng.sample(range(len(templates)), k))
        return [self.x(templates[i], **slots) for i in idx]

    def comments(self, pool: Sequence[str], lo: int, hi: int, **slots: Any) -> list[str]:
        """A comment section as scraped pages often keep it: a count line, then one comment per paragraph."""
        chosen = self.sample(pool, self.rng.randint(lo, hi))
        if not chosen:
            return []
        out = []
        for template in chosen:
            day = self.today + dt.timedelta(days=self.rng.randint(0, 90))
            out.append(self.f("{user} [said|wrote|][ on {date}|]:", user=self.username(), date=long_date(day))
                       + " " + self.x(template, **slots))
        return out

    # -- entities ---------------------------------------------------------------------------------------
    def person(self, name: str) -> Person:
        return self.w.people[name]

    def intro(self, p: Person, town_known: bool = False) -> str:
        """First mention of a person with an appositive built from world facts (job, age, hometown)."""
        age = p.age_in(self.today.year)
        options = [f"{p.name}, {a_an(p.job)} from {p.hometown},", f"{p.name}, {age},"]
        if not p.job.startswith(("retired", "student")):
            options.append(f"{p.name}, who works as {a_an(p.job)} in {p.hometown},")
        if " " not in p.job and p.job not in ("mayor", "student"):
            options.append(f"{p.hometown} {p.job} {p.name}")
        if town_known:
            options.append(f"{p.name}, {a_an(p.job)},")
        return self.pick(options)

    def resident_quote(self, town: Town, topic: str, who: str | None = None) -> str:
        p = self.person(who or self.pick(town.residents))
        years = self.rng.randint(2, max(3, p.age_in(self.today.year) - 2))
        quote = self.x(self.pick(_OPINIONS), topic=topic, town=town.name)
        template = self.pick((
            '"{lead}" said {name}, {a_job} who has lived in {town} for {years} years.',
            '{name}, {age}, [said|told the paper|agreed]: "{quote}"',
            '"{lead}" [said|added] {name}, {a_job} [in {town}|from {town}].',
            '{Intro} [said|told reporters] that {he} [was|is] [pleased|not surprised|hopeful]. "{quote}"',
        ))
        return self.x(template, quote=quote, lead=_lead_quote(quote), name=p.name, a_job=a_an(p.job),
                      town=town.name, years=years, age=p.age_in(self.today.year), he=p.he,
                      Intro=self.intro(p, town_known=True))

    def town_sentence(self, town: Town) -> str:
        region = self.w.regions[town.region]
        return self.x(self.pick((
            "{town} is a [town|community] of about {pop} [people|residents] on the {river} River in {region}.",
            "[Founded in {founded}, |]{town} [sits|lies] on the banks of the {river} River[ in {region}|].",
            "With [about|around|roughly] {pop} residents, {town} is [known for its {industry}|one of the "
            "[larger|busier] towns in {region}].",
            "{town}, [founded in {founded}|home to about {pop} people], is [best known|known] for its {industry}.",
            "The climate in {region} is {climate}[, and {town} is no exception|].",
            "{town} is the largest town in {region}." if town.name == region.capital else
            "{town} is about {miles} miles from {capital}, the largest town in {region}.",
        )), town=town.name, pop=f"{town.population:,}", river=town.river, region=region.name,
            founded=town.founded, industry=town.industry, climate=region.climate, capital=region.capital,
            miles=self.w.distance(town.name, region.capital))

    def author_bio(self, site: str, topic: str) -> str:
        author = self.person(self.w.authors[site])
        return self.x(self.pick((
            "About the author: {name} is {a_job} from {town} who [writes|blogs] about {topic}.",
            "{name} [lives in|is based in] {town} and [has written for this site since {year}|writes about "
            "{topic} here].",
            "Written by {name}[, {a_job} in {town}|].",
        )), name=author.name, a_job=a_an(author.job), town=author.hometown, topic=topic,
            year=self.today.year - self.rng.randint(1, 6))

    def future_day(self, lo: int, hi: int) -> dt.date:
        return self.today + dt.timedelta(days=self.rng.randint(lo, hi))

    def past_day(self, lo: int, hi: int) -> dt.date:
        return self.today - dt.timedelta(days=self.rng.randint(lo, hi))

    def day_phrase(self, day: dt.date) -> str:
        """``Saturday, June 8`` style, with the weekday always matching the date."""
        return f"{WEEKDAYS[day.weekday()]}, {MONTHS[day.month - 1]} {day.day}"

    def url(self, domain: str, *parts: str) -> str:
        return "https://" + domain + "/" + "/".join(p for p in parts if p)

    def date_path(self) -> str:
        return f"{self.today.year}/{self.today.month:02d}"

    def username(self) -> str:
        return f"{self.pick(FORUM_ADJS).capitalize()}{self.pick(FORUM_NOUNS).capitalize()}{self.rng.randint(1, 99)}"


def _lead_quote(quote: str) -> str:
    """A quote that precedes ``said X`` ends in a comma, not a period."""
    return quote[:-1] + "," if quote.endswith(".") else quote


def _clause(subject: str, phrase: str) -> str:
    """Turn a pro/con verb phrase into a clause ("is loud" -> "it is loud"; "the lid sticks" stays)."""
    return phrase if phrase.startswith("the ") else f"{subject} {phrase}"


def plural(noun: str) -> str:
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    if noun.endswith(("ch", "sh", "s", "x")):
        return noun + "es"
    return noun + "s"


_OPINIONS = (
    "I think it is [a great idea|long overdue|a good use of our money].",
    "We have been waiting for {topic} for years.",
    "It is about time somebody did something.",
    "I just hope it does not raise our taxes.",
    "My kids are [so excited|really looking forward to it].",
    "It will be good for {town}, [no doubt about it|I am sure of that].",
    "I am not convinced [it is worth the money|the timing is right], [but we will see|to be honest].",
    "This is [exactly|just] what the town needs.",
    "People here care a lot about {topic}.",
    "It is going to make [a real|a big] difference for families [here|in {town}].",
    "[Honestly,|To be fair,|] I did not expect this to happen so soon.",
    "We will be watching closely to see how it goes.",
)
_NEWS_PROJECTS = (
    ("a new public library", "the library"), ("repairs to the {river} River bridge", "the bridge"),
    ("a new community swimming pool", "the pool"), ("bike lanes along Main Street", "the bike lanes"),
    ("an expansion of {school}", "the school expansion"), ("a new water treatment plant", "the plant"),
    ("the renovation of the town hall", "the renovation"), ("a new park along the {river} River", "the park"),
    ("a solar farm on the edge of town", "the solar farm"), ("a new fire station", "the fire station"),
    ("a covered pavilion for the farmers market", "the pavilion"), ("a new skate park", "the skate park"),
    ("new street lights in the old town", "the street lights"), ("a bus line to {capital}", "the bus line"),
)
_NEWS_DETAILS = (
    "[The money will come from|It will be paid for by] [a state grant and local taxes|a bond approved by "
    "voters|the town's reserve fund].",
    "[Two|Several|A few] council members [raised concerns about|questioned] the cost.",
    "The [plan|project] [was first proposed|came up] in {year}.",
    "The vote came after a [two|three]-hour meeting [that drew about {crowd} residents|in a packed room].",
    "[Supporters|Backers of the plan] say {short} will [serve the town for decades|attract new families].",
    "[Critics|Opponents] [argued|said] the town should [fix its roads first|wait for a second grant].",
    "A public meeting about {short} will be held at {place} on {meet}.",
    "[Plans|Drawings] for {short} [are available|can be seen] at the town hall.",
)


_BRIEFS = (
    "[Main Street|{street} Street] will be closed [near {mark}|downtown] on {day} for [road work|a street "
    "fair|tree trimming].",
    "The {town} library will [extend its opening hours|be closed for repairs] [starting {day}|until {day}].",
    "Police are asking for help finding a [brown|black|white] [dog|cat] that went missing near {mark} on {day}.",
    "{school} will hold its [spring concert|graduation ceremony|open house] on {day} at {h} p.m.",
    "A [blood drive|food drive|used book sale] will take place at {mark} on {day}.",
    "The {fest} is looking for volunteers for this year's event in {month}.",
    "[Free|Low cost] flu shots are available at the {town} clinic [this week|until {day}].",
    "The {team} will play their next home game at {stadium} on {day}.",
    "A new bakery opened on {street} Street [last week|on {day}], [the first in years|next to the post office].",
    "The {town} council will meet again on {day} at {h} p.m. at the town hall.",
    "[Residents|Homeowners] along the {river} River are reminded to clear their gutters before the rainy season.",
    "Mayor {mayor} will hold office hours at the town hall on {day}.",
)


def _brief(g: _Writer, town: Town, template: str | None = None) -> str:
    w = g.w
    team = w.teams[town.team]
    return g.x(template or g.pick(_BRIEFS), street=g.pick(LAST_NAMES), mark=g.pick(town.landmarks)[0], town=town.name,
               day=g.day_phrase(g.future_day(1, 20)), school=town.school, h=g.rng.randint(5, 8),
               fest=town.festival, month=MONTHS[w.festivals[town.festival].month - 1], team=team.name,
               stadium=team.stadium, river=town.river, mayor=town.mayor)


def _local_news(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    town: Town = w.towns[g.focus_town] if g.focus_town else g.pick(list(w.towns.values()))
    region = w.regions[town.region]
    mayor = g.person(town.mayor)
    reporter = g.person(g.pick(town.reporters))
    kind = g.pick(("council", "council", "council", "flood", "business", "school"))
    paras: list[str] = []
    meeting = g.past_day(1, 6)
    if kind == "council":
        project, short = g.pick(_NEWS_PROJECTS)
        project = project.format(river=town.river, school=town.school, capital=region.capital)
        cost = g.pick((0.4, 0.8, 1.2, 1.5, 2.4, 3.1, 4.5, 6.0, 8.2, 12.5))
        yes = rng.randint(town.council_size // 2 + 1, town.council_size)
        title = g.x("[{town} council approves {project}|Council says yes to {project} in {town}|"
                    "{town} to get {project}]", town=town.name, project=project)
        paras.append(g.x(
            "The {town} [city|town] council voted {yes}-{no} on {day} to approve {project}, "
            "[a project expected to cost|at an estimated cost of|with a price tag of] about ${cost} million.",
            town=town.name, yes=yes, no=town.council_size - yes, day=WEEKDAYS[meeting.weekday()],
            project=project, cost=cost))
        paras.append(" ".join([
            g.x(g.pick((
                '"This is a [great|proud|big] day for {town}," said Mayor {mayor}[ after the vote|].',
                '{town} Mayor {mayor} [called|described] the decision "[a win for every family in town|an '
                'investment in our future|the right call]."',
                'The mayor of {town}, {mayor}, [said|told the council] that {short} [had been discussed for '
                '{n} years|was one of {his} campaign promises|was a top priority].',
            )), town=town.name, mayor=mayor.name, short=short, n=rng.randint(2, 9), his=mayor.his),
            g.x("[Work is expected to start|Construction could begin] [in the spring|next year|this fall|within "
                "{n} months] and [take about {m} months|be finished by {year}].", n=rng.randint(2, 8),
                m=rng.randint(6, 30), year=g.today.year + rng.randint(1, 3)),
        ]))
        paras.append(" ".join(g.some(_NEWS_DETAILS, 2, 5, short=short, year=g.today.year - rng.randint(1, 6),
                                     crowd=rng.randint(3, 30) * 10, place=g.pick((town.school, "the town hall")),
                                     meet=g.day_phrase(g.future_day(5, 30)))))
        if yes < town.council_size:
            member = g.person(g.pick(town.council))
            paras.append(g.x('Council member {name}, who voted against the plan, [said|argued] that '
                             '"[the timing is wrong|we cannot afford it right now|residents deserve more say]."',
                             name=member.name))
        elif g.chance(0.5):
            member = g.person(g.pick(town.council))
            paras.append(g.x('"[Everyone agreed|It was an easy vote]," said council member {name}.',
                             name=member.name))
        for who in g.sample(town.residents, rng.choice((1, 2, 2))):
            paras.append(g.resident_quote(town, short, who))
    elif kind == "flood":
        river_towns = sorted(t.name for t in w.towns.values() if t.river == town.river and t.name != town.name)
        feet = rng.randint(3, 14)
        title = g.x("[Heavy rain floods|Flooding hits|{river} River rises in] {town}", river=town.river,
                    town=town.name)
        paras.append(g.x(
            "[Heavy rain|Two days of heavy rain|A powerful storm] [caused|pushed] the {river} River to rise {feet} "
            "feet [above normal|above flood stage] in {town} on {day}, [flooding|closing] [several streets|roads "
            "near the river|the riverside park].", river=town.river, feet=feet, town=town.name,
            day=WEEKDAYS[meeting.weekday()]))
        if river_towns:
            paras.append(g.x("[Towns further along the river|Other towns on the {river}], including {others}, "
                             "[were also|are also] [on alert|preparing for high water].", river=town.river,
                             others=join_list(g.sample(river_towns, 3))))
        paras.append(g.x(
            '"[Please stay away from the river|Do not drive through flooded roads]," {town} Mayor {mayor} said. '
            '"[We will get through this together|Our crews are working around the clock]."',
            town=town.name, mayor=mayor.name))
        paras.extend(g.some((
            "About {homes} homes [lost power|were without power] [overnight|for several hours].",
            "[Volunteers|Neighbors] filled sandbags [at the fire station|outside the town hall] [until late at "
            "night|through the night].",
            "{school} was closed on {day2} [as a precaution|because buses could not get through].",
            "The last time the {river} rose this high was in {year}.",
            "[No injuries were reported|Nobody was hurt], [officials said|according to the fire department].",
            "[Insurance agents|The town] will [hold a meeting|set up a help desk] for [damaged homes|affected "
            "families] at the town hall.",
        ), 2, 5, homes=rng.randint(2, 40) * 10, school=town.school, day2=WEEKDAYS[(meeting.weekday() + 1) % 7],
            river=town.river, year=g.today.year - rng.randint(3, 40)))
        paras.append(g.x("[Forecasters expect|The weather service expects] [the water to go down|drier weather] "
                         "[by the weekend|in the next few days|by {day}].", day=WEEKDAYS[g.future_day(2, 5).weekday()]))
        paras.append(g.resident_quote(town, "the river"))
    elif kind == "business":
        company = g.pick(list(w.companies.values()))
        jobs = rng.choice((20, 35, 50, 80, 120, 150, 200, 300))
        facility = g.pick(("factory", "warehouse", "store", "office", "distribution center", "repair shop"))
        title = g.x("{company} to open {facility} in {town}", company=company.name, facility=facility,
                    town=town.name)
        paras.append(g.x(
            "{company}, the {industry} company [based in|headquartered in] {hq}, will open a new {facility} in "
            "{town} [next year|this fall|in {year}], [creating|bringing] about {jobs} jobs.",
            company=company.name, industry=company.industry, hq=company.hq, facility=facility, town=town.name,
            year=g.today.year + 1, jobs=jobs))
        ceo = g.person(company.ceo)
        paras.append(g.x('"{town} has [great people|a skilled workforce|everything we need]," said {ceo}, chief '
                         'executive of {company}. "[We are excited to grow here|This is a big step for us]."',
                         town=town.name, ceo=ceo.name, company=company.name))
        paras.append(g.x('Mayor {mayor} [welcomed the news|said the town was thrilled]. "[{jobs} new jobs|This] '
                         'will [mean a lot|make a real difference] for {town}," {he} said.',
                         mayor=mayor.name, jobs=jobs, town=town.name, he=mayor.he))
        paras.append(g.x("{company} was founded in {founded} by {founder} and [now employs|has] about "
                         "{employees} people. [It is best known for the {full}.|Its products include the {full}.]",
                         company=company.name, founded=company.founded, founder=company.founder,
                         employees=f"{company.employees:,}", full=w.products[g.pick(company.products)].full))
        paras.extend(g.some((
            "[Hiring will start|The company will start hiring] [in the spring|in a few months|next month].",
            "The {facility} will be built on [an empty lot|the site of an old mill|land] near the {river} River.",
            "[The town offered|{company} will receive] a [tax break|grant] [worth about ${m} million|to cover part "
            "of the cost].",
            "[Local shops|Business owners] [hope|expect] the new jobs will bring more customers downtown.",
        ), 1, 4, facility=facility, river=town.river, company=company.name, m=rng.randint(1, 5)))
        paras.append(g.resident_quote(town, "new jobs"))
    else:
        principal = g.person(town.principal)
        event = g.pick(("won the regional science fair", "won the state robotics championship",
                        "raised ${n},000 for the food bank", "planted {n}0 trees along the {river} River",
                        "put on a sold-out musical", "won the regional debate contest"))
        event = event.format(n=rng.randint(2, 9), river=town.river)
        title = g.x("{school} students {event}", school=town.school, event=event)
        paras.append(g.x("Students at {school} {event} [last week|on {day}|this month], [the school announced|"
                         "principal {principal} said].", school=town.school, event=event,
                         day=WEEKDAYS[meeting.weekday()], principal=principal.name))
        paras.append(g.x('"[I could not be prouder|We are so proud of them]," said {principal}, who has led '
                         '{school} since {year}. "[They worked incredibly hard|They earned this]."',
                         principal=principal.name, school=town.school, year=g.today.year - rng.randint(2, 15)))
        paras.extend(g.some((
            "[The team|The group] of {k} students [practiced|met] [after school|on weekends] for {m} months.",
            "{helper}, [a parent|a volunteer] who helped the team, said the students [did all the work "
            "themselves|never gave up].",
            "[Next|In {month}], they will [compete|represent {region}] at the state [finals|level].",
            "The school has about {n} students and [is the only high school in {town}|draws students from "
            "across {town}].",
        ), 2, 4, k=rng.randint(4, 15), m=rng.randint(2, 8), helper=g.pick(town.residents),
            month=MONTHS[(g.today.month + 1) % 12], region=region.name, n=f"{rng.randint(3, 14) * 100:,}",
            town=town.name))
        paras.append(g.resident_quote(town, "the school"))
    paras.insert(min(2, len(paras)), g.town_sentence(town))
    if g.chance(0.5):
        paras.insert(0, g.x("[Story|Reporting] by {reporter}.", reporter=reporter.name))
    else:
        paras.append(g.x("{reporter} [is a staff writer for|covers local news for|reports for] {paper}.",
                         reporter=reporter.name, paper=town.newspaper))
    n_briefs = rng.choice((0, 0, 1, 2, 3))
    for i in range(n_briefs):
        paras.append(("In other news: " if i == 0 else "") + _brief(g, town))
    url = g.url(town.newspaper_domain, "news", g.date_path(), slugify(title))
    return Doc(title, paras, url, g.when, town=town.name)


def _news_roundup(g: _Writer) -> Doc:
    """A regional page of short news items, each about a different town."""
    w, rng = g.w, g.rng
    region: Region = g.pick(list(w.regions.values()))
    towns = g.sample([t for t in w.towns.values() if t.region == region.name], rng.randint(3, 6))
    title = g.x("[{region} news roundup|News from around {region}|{region} briefs]", region=region.name)
    paras = [g.x("[Here is|This is] [what is happening|the news] [around|across] {region} this [week|weekend].",
                 region=region.name)]
    for town in towns:
        items = [_brief(g, town, t) for t in g.sample(_BRIEFS, rng.randint(1, 3))]
        paras.append(g.x("[In {town}|{town}]:", town=town.name) + " " + " ".join(items))
        if g.chance(0.4):
            paras.append(g.x('"[We hope to see everyone there|Everyone is welcome]," said {town} Mayor {mayor}.',
                             town=town.name, mayor=town.mayor))
    home = towns[0]
    return Doc(title, paras, g.url(home.newspaper_domain, "news", g.date_path(), slugify(title)), g.when)


_RECIPE_INTROS = (
    "This {name} is [one of my favorite [weeknight dinners|recipes|dishes]|my go-to [weeknight dinner|recipe]|a "
    "much loved [dish|family recipe]] and [it never fails|everyone asks for seconds].",
    "I first made this {name} [last winter|years ago|for a family dinner] and [have made it|cooked it] "
    "[dozens of times|every month] since.",
    "If you [are looking for|want] {a_dish} that is [simple|easy|comforting] and [full of flavor|filling], "
    "this {name} is for you.",
    "[Nothing beats|There is nothing like] a good {dish} on a [cold|busy|lazy] [evening|Sunday].",
)
_RECIPE_STORY = (
    "My [grandmother|mother|aunt] used to make something like this [every {season}|on Sundays|for "
    "holidays], and the smell still takes me back.",
    "[The first time|When] I [made|cooked] it for friends, [nobody believed|they could not believe] how "
    "easy it was.",
    "[It is|This is] [the kind of|a] [recipe|dish] you can [make with your eyes closed|adapt to what is in "
    "your fridge] [once you have made it a few times|after a while].",
    "I [tested|tried] this recipe [five|a dozen|many] times to get it just right.",
    "[We eat|My family eats|We have] it at least once a [week|month] [in the {season}|all year round].",
)
_RECIPE_COMMENTS = (
    "Made this [last night|on Sunday|for my parents] and [my family loved it|it was a hit]!",
    "Can I use {other} instead of {main}?",
    "How long does this keep in the freezer?",
    "I added [a little more garlic|a pinch of chili|extra salt] and it was perfect.",
    "This took longer than {minutes} minutes for me, but it was worth it.",
    "[Five stars|Ten out of ten], [will make again|my new favorite].",
    "Do you think this would work in a slow cooker?",
    "I had it at {rest} in {town} and this tastes just like theirs.",
    "[Easy to follow|Great instructions], thank you!",
    "Mine came out [a bit dry|too salty], I think I overcooked it.",
)


def _recipe(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    recipe: Recipe = g.pick(list(w.recipes.values()))
    chef = g.person(recipe.author)
    restaurant = w.restaurants[chef.employer] if chef.employer else None
    spec = DISH_TYPES[recipe.dish_type]
    site = g.pick(RECIPE_SITES)
    other = g.pick([m for m in spec["mains"] if m != recipe.main])
    title = g.x("[|The best |Easy |My favorite |How to make ]{name}[| recipe]", name=recipe.name)
    title = title[:1].upper() + title[1:]
    season = g.pick(("spring", "summer", "fall", "winter"))
    paras = [g.x(g.pick(_RECIPE_INTROS), name=recipe.name, a_dish=a_an(recipe.dish_type), dish=recipe.dish_type)]
    paras.append(" ".join(g.some(_RECIPE_STORY, 1, 3, season=season)))
    if restaurant is not None:
        paras.append(g.x(
            "[The recipe comes from|This recipe was shared by|We got this recipe from] chef {chef}[, who runs|, "
            "owner of] {rest} in {town}[, a {cuisine} restaurant|]. [{He} has cooked there since {year}.|]",
            chef=chef.name, rest=restaurant.name, town=restaurant.town, cuisine=restaurant.cuisine,
            He=chef.he.capitalize(), year=restaurant.opened))
    paras.append(" ".join(g.some((
        "[It takes|You will need] about {minutes} minutes of cooking time, and [it serves|it feeds|it makes "
        "enough for] {servings} people.",
        "[The secret|The trick] is [to be patient|not to rush the first step|good fresh ingredients].",
        "[You can make it ahead|It keeps well in the fridge for three days|Leftovers taste even better the next "
        "day].",
        "[It goes well with|Serve it with|We like it with] [a glass of white wine|a simple green salad|roasted "
        "vegetables|a cold beer].",
    ), 1, 3, minutes=recipe.minutes, servings=recipe.servings)))
    # C4 keeps only lines that end in punctuation, so lists are written as sentences.
    paras.append(g.x("[Ingredients|You will need]: {items}.", items="; ".join(recipe.ingredients[:-1]) + "; and "
                     + recipe.ingredients[-1]))
    paras.append(g.x("[Here is how to make it.|Instructions are below.|Now the method.]"))
    steps = [expand(rng, s, {"main": recipe.main, "minutes": recipe.minutes}) for s in spec["steps"]]
    numbered = g.chance(0.5)
    paras.extend(f"{i}. {s}" if numbered else s for i, s in enumerate(steps, 1))
    if g.chance(0.6):
        paras.append(g.x("[Tip|Note]: [you can swap|try replacing] the {main} [with|for] {other} [for a "
                         "change|if you prefer].", main=recipe.main, other=other))
    paras.append(g.x("[Enjoy|Happy cooking|Have fun], and [let me know in the comments how it turned out|tell me "
                     "how it goes]!"))
    if g.chance(0.5):
        paras.append(g.author_bio(site, "home cooking"))
    rest = restaurant or w.restaurants[g.pick(list(w.restaurants))]
    paras.extend(g.comments(_RECIPE_COMMENTS, 0, 5, other=other, main=recipe.main, minutes=recipe.minutes,
                            rest=rest.name, town=rest.town))
    return Doc(title, paras, g.url(site, "recipes", slugify(recipe.name)), g.when)


_REVIEW_COMMENTS = (
    "Thanks for the review, I [ordered one|just bought it] [last week|yesterday].",
    "Mine [broke|stopped working] after [two months|a year]. [Customer service replaced it.|Never again.]",
    "How does it compare to the {other}?",
    "I have had the {full} for [a year|two years] and [agree with everything|still love it].",
    "[Great|Helpful|Very detailed] review, thank you!",
    "{price} is too much for {a_noun} in my opinion.",
    "Is it still on sale for {price}?",
    "[I returned mine|I gave mine to my brother] because {con}.",
)


_REVIEW_USE = (
    "I used it [every day|most days|on weekends] for {weeks} weeks[ at home|, both at home and on trips|].",
    "[After a few days|Within a week] I [stopped thinking about it|got used to it], which is a good sign.",
    "My [partner|teenage son|sister] [also tried it|borrowed it for a weekend] and [agreed with me|liked it too].",
    "[It is|This is] [not perfect|far from perfect], but [few|not many] {nouns} at this price are.",
    "[If you are on a budget|If money is tight], [there are cheaper options|you might wait for a sale].",
    "[The warranty is|It comes with a warranty of] {years} years[, which is better than most|].",
)


def _product_review(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    product: Product = g.pick(list(w.products.values()))
    maker = w.companies[product.maker]
    cat = product.category
    it = cat.pronoun
    site = g.pick(REVIEW_SITES)
    rating = max(1, min(5, product.quality + g.pick((-1, 0, 0, 0, 0, 1))))
    weeks = rng.randint(2, 12)
    title = g.x("[{full} review|Review: {full}|{full} review: [worth the money|is it any good]?]",
                full=product.full)
    paras = [g.x(g.pick((
        "The {full} [costs|sells for|retails for] {price}[ and is made by {maker}[, a company based in {hq}|]|].",
        "{maker} [released|launched] the {full} in {launch}, and it [still sells for|costs] {price}.",
        "[I have been using|I tested|For the last {weeks} weeks I have used] the {full} from {maker}"
        "[ for {weeks} weeks|], which [costs|sells for] {price}.",
    )), full=product.full, price=money(product.price), maker=maker.name, hq=maker.hq,
        launch=product.launch_year, weeks=weeks)]
    paras.append(" ".join(g.some((
        "I [needed|was looking for] a new {noun} [because my old one broke|after moving house|for a long "
        "trip|as a gift for my partner].",
        "[There are a lot of|There are dozens of] {nouns} [on the market|out there], so I [read|compared] "
        "[a lot of|many] reviews first.",
        "[I bought it with my own money|I paid full price for it]; nobody paid me for this review.",
    ), 1, 3, noun=cat.noun, nouns=plural(cat.noun))))
    if g.chance(0.5):
        paras.append(g.x("[Specifications|Key facts]: made by {maker}; released in {launch}; price {price}; "
                         "{features}.", maker=maker.name, launch=product.launch_year, price=money(product.price),
                         features="; ".join(product.features)))
    else:
        paras.append(g.x("[It comes with|It has|Key features include] {features}.",
                         features=join_list(list(product.features))))
    build = {1: "feels cheap", 2: "feels a bit flimsy", 3: "feels fine", 4: "feels solid",
             5: "feels really well made"}[product.quality]
    paras.append(g.x("[Out of the box|Right away], {it} {build}. [Setting it up|Getting started] took about {m} "
                     "minutes[ and the instructions were clear|, mostly reading the manual|].",
                     it=it, build=build.replace("feels", "feel") if it == "they" else build,
                     m=rng.randint(2, 30)))
    paras.append(" ".join(g.some(_REVIEW_USE, 1, 3, weeks=weeks, nouns=plural(cat.noun), years=rng.randint(1, 5))))
    good = g.sample(cat.pros, rng.randint(1, 3))
    bad = g.sample(cat.cons, rng.randint(1, 2) if rating < 4 else 1)
    paras.append(g.x("[What I liked|The good|Pros]: {good}.", good=join_list([_clause(it, x) for x in good])))
    paras.append(g.x("[What I did not like|The bad|Downsides|Cons]: {bad}.",
                     bad=join_list([_clause(it, x) for x in bad])))
    rivals = [p for p in w.products.values() if p.category.noun == cat.noun and p.maker != maker.name]
    if rivals and g.chance(0.7):
        rival = g.pick(rivals)
        cheaper = "cheaper" if product.price < rival.price else "more expensive"
        better = ("better" if product.quality > rival.quality else
                  "not as good" if product.quality < rival.quality else "about as good")
        paras.append(g.x("[Compared with|Next to] the {rival} from {rmaker}, which costs {rprice}, the {name} is "
                         "{cheaper} and[, in my opinion,|] {better}.", rival=rival.full, rmaker=rival.maker,
                         rprice=money(rival.price), name=product.name, cheaper=cheaper, better=better))
    verdict = {1: "I would not buy it again", 2: "I would look elsewhere", 3: "it is fine for the price",
               4: "it is a solid choice", 5: "it is the best {noun} I have owned"}[rating]
    paras.append(g.x("[Overall|In the end|Bottom line], {verdict}. [Rating|My rating|Score]: {rating} out of 5 "
                     "stars.", verdict=verdict.format(noun=cat.noun), rating=rating))
    others = [w.products[n] for n in maker.products if n != product.name]
    if others and g.chance(0.5):
        o = g.pick(others)
        paras.append(g.x("{maker} also [makes|sells] the {full}, which [costs|goes for] {price}.",
                         maker=maker.name, full=o.full, price=money(o.price)))
    if g.chance(0.4):
        paras.append(g.x("{maker} was founded in {year} [and is based in {hq}|by {founder}].",
                         maker=maker.name, year=maker.founded, hq=maker.hq, founder=maker.founder))
    if g.chance(0.4):
        paras.append(g.author_bio(site, "gear and gadgets"))
    other = g.pick(rivals).full if rivals else g.pick(list(w.products.values())).full
    paras.extend(g.comments(_REVIEW_COMMENTS, 0, 5, other=other, full=product.full, price=money(product.price),
                            a_noun=a_an(cat.noun), con=_clause(it, g.pick(cat.cons))))
    return Doc(title, paras, g.url(site, slugify(cat.noun), slugify(title)), g.when)


_TRAVEL_STOPS = (
    "[We started|Our first stop was|Do not miss] {name}[, which was {adj}|]. [We spent {h} hours there.|It is "
    "free on weekdays.|Get there early to beat the crowds.|]",
    "[The highlight of the trip|My favorite part] was {name}. [The kids loved it.|It is {adj}.|]",
    "If you like {kinds}, {name} is [worth a visit|a must].",
    "[On the second day|Later] we [walked|wandered] over to {name}[, which is {adj}|]. [Bring comfortable "
    "shoes.|There is a small cafe next to it.|]",
    "[We also visited|Another favorite was] {name}. [Allow at least an hour.|The guided tour is worth it.|]",
)
_TRAVEL_COMMENTS = (
    "We are going to {town} [next month|this summer], thanks for the tips!",
    "[Love|Loved] this post. {town} is [so underrated|one of my favorite places].",
    "Did you [visit|see] the {fest}? We went [last year|once] and it was [great|so much fun].",
    "How was the drive from {home}?",
    "[Beautiful photos|Great write-up]! Adding {town} to my list.",
    "I grew up near {town}, glad you enjoyed it.",
)


def _travel_blog(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    town: Town = g.pick(list(w.towns.values()))
    region = w.regions[town.region]
    site = g.pick(TRAVEL_SITES)
    home: Town = g.pick([t for t in w.towns.values() if t.name != town.name])
    miles = w.distance(town.name, home.name)
    n_days = rng.randint(2, 4)
    season = g.pick(("spring", "summer", "fall", "winter"))
    title = g.x("[A weekend in {town}|{n} things to do in {town}|Visiting {town}, {region}|Our trip to "
                "{town}]", town=town.name, region=region.name, n=rng.randint(4, 9))
    paras = [g.x("[Last {season}|This {season}|A few weeks ago] we [spent|drove over for] {days} days in "
                 "{town}, [about|roughly] {miles} miles from [our home in|where we live in] {home}.",
                 season=season, days=small_number(n_days), town=town.name, miles=miles, home=home.name)]
    hours = round(miles / 50)
    paras.append(g.x("[The drive took|It took us] {time}[ with a stop for lunch|]. [We had never been "
                     "before.|It was our {k} visit.]", time="about an hour" if hours <= 1 else f"about {hours} hours",
                     k=g.pick(("second", "third", "first"))))
    paras.append(" ".join([g.town_sentence(town), g.town_sentence(town)]) if g.chance(0.4)
                 else g.town_sentence(town))
    stops = g.sample(_TRAVEL_STOPS, 3)
    for (name, kind), template in zip(g.sample(town.landmarks, rng.randint(1, 3)), stops, strict=False):
        paras.append(g.x(template, name=name, kinds=plural(kind), h=rng.randint(2, 4),
                         adj=g.pick(("beautiful", "stunning", "really charming", "bigger than it looks",
                                     "very peaceful", "full of history"))))
    if town.hotels:
        hotel = w.hotels[g.pick(town.hotels)]
        paras.append(g.x("We stayed at the {hotel}, a {stars}-star [hotel|place] [with|that has] {rooms} rooms. "
                         "[A room costs|Rooms start at|We paid] {price} a night[ and breakfast is included|]. "
                         "[The staff were lovely.|Ask for a room facing the river.|]",
                         hotel=hotel.name, stars=hotel.stars, rooms=hotel.rooms, price=money(hotel.nightly)))
    for rname in g.sample(town.restaurants, rng.randint(1, 2)):
        rest = w.restaurants[rname]
        paras.append(g.x("[For dinner we went to|One night we ate at|Try] {rest}, [a {cuisine} restaurant run by "
                         "chef {owner}|where chef {owner} cooks {cuisine} food]. [The {dish} is|Order the {dish}, "
                         "it is] [amazing|the best thing on the menu], and [mains|dishes] are about {price}.",
                         rest=rest.name, cuisine=rest.cuisine, owner=rest.owner, dish=rest.signature,
                         price=money(rest.entree_price)))
    fest = w.festivals[town.festival]
    paras.append(g.x("[If you can, visit in {month} for|Plan your visit around|Every {month} the town hosts] "
                     "the {fest}, [with|which has] {activities}.", month=MONTHS[fest.month - 1],
                     fest=fest.name, activities=fest.activities))
    paras.append(g.x("[The weather in {region} is {climate}|{region} is {climate}], so [pack|bring] "
                     "[layers|a good jacket|comfortable shoes].", region=region.name, climate=region.climate))
    team = w.teams[town.team]
    if g.chance(0.4):
        paras.append(g.x("Sports fans can [catch|watch] the {team} [play|at home] at {stadium}.", team=team.name,
                         stadium=team.stadium))
    nearby = sorted((t for t in w.towns.values() if t.name != town.name),
                    key=lambda t: w.distance(t.name, town.name))
    near = nearby[rng.randint(0, 2)]
    paras.append(g.x("[{near} is only {miles} miles away, so it is easy to add a day trip|If you have an extra "
                     "day, {near} is only {miles} miles away].", near=near.name,
                     miles=w.distance(near.name, town.name)))
    paras.append(g.x("[Would we go back? Absolutely.|We will definitely be back.|{town} surprised us in the best "
                     "way.]", town=town.name))
    if g.chance(0.5):
        paras.append(g.author_bio(site, "small town travel"))
    paras.extend(g.comments(_TRAVEL_COMMENTS, 0, 4, town=town.name, fest=fest.name, home=home.name))
    return Doc(title, paras, g.url(site, g.date_path(), slugify(title)), g.when)


_HOWTO_COMMENTS = (
    "This worked for me, thanks!",
    "Step {k} was the hardest part, but I got there.",
    "[Great guide|Very clear], I wish I had found it sooner.",
    "What if I do not have [the right tools|a lot of time]?",
    "[My dad|My neighbor] showed me a similar trick years ago.",
    "I tried this [last weekend|yesterday] and it [took about an hour|was easier than I thought].",
)


def _how_to(g: _Writer) -> Doc:
    w = g.w
    task, category, steps, tips = g.pick(HOW_TO_TASKS)
    site = g.pick(HOWTO_SITES)
    title = g.x("[How to {task}|How to {task} in {n} easy steps|A beginner's guide: how to {task}]", task=task,
                n=len(steps))
    paras = [g.x(g.pick((
        "[Learning|Knowing] how to {task} [is easier than you think|saves time and money|is a useful skill].",
        "[Many people|A lot of readers] ask us how to {task}. [Here is our step by step guide.|Here is how we do "
        "it.]",
        "You do not need [to be an expert|much experience] to {task}. [Just follow these steps.|Follow the "
        "steps below.]",
    )), task=task)]
    paras.append(" ".join(g.some((
        "[Doing it yourself|Learning this] [saves money|is satisfying|takes less time than calling a "
        "professional].",
        "[It takes|Plan for] about {m} minutes[ the first time|].",
        "[Read all the steps before you start.|Gather everything you need first.]",
        "[We have done this|Our team has tried this] [dozens of|many] times, and [these steps work|this is the "
        "method that works best].",
    ), 1, 3, m=g.pick((10, 15, 20, 30, 45, 60, 90)))))
    numbered = g.chance(0.6)
    for i, step in enumerate(steps, 1):
        text = g.x(step)
        if g.chance(0.25):
            text += " " + g.x(g.pick(("Take your time here.", "Do not skip this step.", "This is the most "
                                      "important step.", "[Be careful|Go slowly] here.", "[It is fine if it is "
                                      "not perfect.|Check your work before moving on.]")))
        paras.append(f"Step {i}: {text}" if numbered else text)
    if category is not None:
        cands = [p for p in w.products.values() if p.category.noun == category]
        if cands:
            p = g.pick(cands)
            paras.append(g.x("[We used|For this guide we used|Our pick for this job is] the {full} from {maker}"
                             "[, which costs {price}|].", full=p.full, maker=p.maker, price=money(p.price)))
    for tip in g.sample(tips, g.rng.randint(1, len(tips))):
        paras.append(g.x("[Tip|A tip from us|Pro tip]: {tip}", tip=tip))
    if g.chance(0.5):
        paras.append(g.x("[The most common mistake is|Most people go wrong by] [rushing|skipping the "
                         "preparation|using the wrong tools|giving up too early]."))
    if g.chance(0.5):
        paras.append(g.author_bio(site, "home projects"))
    paras.extend(g.comments(_HOWTO_COMMENTS, 0, 4, k=g.rng.randint(2, len(steps))))
    return Doc(title, paras, g.url(site, slugify(title)), g.when)


_FORUM_SITES = ("forums.townsquaretalk.com", "community.askaneighbor.net", "www.thebackporchforum.com",
                "forum.gearheadsunite.com")
_FORUM_FILLERS = (
    "Just my two cents.", "Hope this helps.", "Good luck!", "Let us know what you decide.",
    "Welcome to the forum, by the way.", "I had the same question last year.", "Take it with a grain of salt.",
    "Your mileage may vary.", "[Seconding|Agree with] what the others said.", "Feel free to message me.",
)


def _reply(g: _Writer, body: str) -> str:
    extra = f" {g.x(g.pick(_FORUM_FILLERS))}" if g.chance(0.35) else ""
    return g.f("{user} [replied|wrote|said]:", user=g.username()) + " " + body + extra


def _forum(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    kind = g.pick(("product", "moving", "recipe", "team"))
    asker = g.username()
    paras: list[str] = []
    if kind == "product":
        p: Product = g.pick(list(w.products.values()))
        maker = w.companies[p.maker]
        it = p.category.pronoun
        title = g.x("[Is the {full} worth it|Anyone tried the {full}|{full} or something else]?", full=p.full)
        paras.append(g.x("{asker} wrote: [I am thinking about buying|I am looking at|My partner wants] the {full}. "
                         "It is {price} [right now|at the moment]. [Is it worth it?|Any experience with it?|Should I "
                         "wait for a sale?] [I mostly need it for {use}.|]", asker=asker, full=p.full,
                         price=money(p.price), use=g.pick(("everyday use", "a small apartment", "my workshop",
                                                           "weekend trips", "a gift"))))
        for _ in range(rng.randint(3, 7)):
            mood = max(1, min(5, p.quality + g.pick((-1, 0, 0, 1))))
            reply = g.x({
                1: "[Mine broke after a month, avoid it.|Save your money.|Worst purchase I made this year.]",
                2: "[It is ok but I returned mine.|Not great, not terrible.|I expected more for the price.]",
                3: "[It does the job, nothing special.|It is fine.|Decent for the money.]",
                4: "[I have had mine for a year and I like it.|Good choice, go for it.|Happy with mine.]",
                5: "[Best purchase I made this year, highly recommended.|Love it.|Buy it, you will not regret "
                   "it.]",
            }[mood])
            extra = g.x(g.pick(("{pro}.", "Only complaint is that {con}.", "{maker} support was [helpful|slow "
                                "to answer] when I contacted them.", "{maker} is based in {hq}, [if that "
                                "matters to you|they make good stuff].", "I paid {price} for mine.", "")),
                        pro=_clause(it, g.pick(p.category.pros)), con=_clause(it, g.pick(p.category.cons)),
                        maker=maker.name, hq=maker.hq, price=money(p.price))
            paras.append(_reply(g, f"{reply} {extra}".strip()))
        if g.chance(0.5):
            paras.append(g.x("{asker} replied: [Thanks all|Thank you everyone], [I ordered it|I think I will wait "
                             "for a sale|I will go with something else].", asker=asker))
    elif kind == "moving":
        town: Town = g.pick(list(w.towns.values()))
        region = w.regions[town.region]
        title = g.x("[Moving to {town}, any advice|What is it like living in {town}]?", town=town.name)
        paras.append(g.x("{asker} wrote: [We are moving to|My family is relocating to|I got a job in] {town} "
                         "[next month|this summer|in the fall]. [What are the neighborhoods like?|Any tips?|"
                         "Is it a good place for kids?]", asker=asker, town=town.name))
        rest = w.restaurants[g.pick(town.restaurants)]
        facts = [
            g.x("It is a [nice|friendly|quiet] [town|place], about {pop} people.", pop=f"{town.population:,}"),
            g.x("{school} has a good reputation.", school=town.school),
            g.x("Houses cost about {ppsf} per square foot [last time I checked|these days].",
                ppsf=money(town.price_per_sqft)),
            g.x("[Try|Do not miss] {rest}, [best food in town|great {cuisine} food].", rest=rest.name,
                cuisine=rest.cuisine),
            g.x("[Go to|Buy tickets for] the {fest} in {month}.", fest=town.festival,
                month=MONTHS[w.festivals[town.festival].month - 1]),
            g.x("[The mayor, {mayor}, is|Mayor {mayor} is] [pretty popular|doing a decent job].", mayor=town.mayor),
            g.x("Walks along the {river} River are lovely in the evening.", river=town.river),
            g.x("Everyone here supports the {team}.", team=town.team),
            g.x("{capital} is {miles} miles away if you need a bigger town.", capital=region.capital,
                miles=w.distance(town.name, region.capital)) if town.name != region.capital else
            g.x("It is the biggest town in {region}, so you have everything you need.", region=region.name),
            g.x("The climate is {climate}, so bring a good coat.", climate=region.climate),
            g.x("A lot of people work in {industry} here.", industry=town.industry),
            g.x("[Visit|Check out] {mark} on your first weekend.", mark=g.pick(town.landmarks)[0]),
        ]
        rng.shuffle(facts)
        for i in range(rng.randint(3, 6)):
            paras.append(_reply(g, " ".join(facts[2 * i : 2 * i + 2])))
        paras.append(g.x("{asker} replied: [Thanks everyone|Thank you all], [this is really helpful|that helps a "
                         "lot]!", asker=asker))
    elif kind == "recipe":
        r: Recipe = g.pick(list(w.recipes.values()))
        chef = g.person(r.author)
        title = g.x("[Help with|Question about] {name}", name=r.name)
        paras.append(g.x("{asker} wrote: I [tried|made] the {name} [recipe|] from chef {chef} and it came out "
                         "[too dry|a bit bland|too runny]. [What did I do wrong?|Any ideas?]", asker=asker,
                         name=r.name, chef=r.author))
        for template in g.sample((
            "Did you cook it for the full {m} minutes? [That matters a lot.|Timing is everything.]",
            "[Use|Try] [fresh|better] {main}, it makes a big difference.",
            "[It|The recipe] serves {s}, so [check your amounts|maybe you doubled something].",
            "[Same thing happened to me|I had the same problem]. [Less heat next time.|More salt helped.]",
            "Chef {chef} runs {rest} in {town}, you could [just ask there|try the real thing there first].",
            "[I make it every week|It is one of my favorites] and [never had that problem|it always works].",
            "Which {dish} recipe did you use? There are a lot of versions.",
        ), rng.randint(2, 5)):
            paras.append(_reply(g, g.x(template, m=r.minutes, main=r.main, s=r.servings, chef=r.author,
                                       rest=chef.employer, town=chef.hometown, dish=r.dish_type)))
    else:
        team: Team = g.pick(list(w.teams.values()))
        title = g.x("[{team} this season|Thoughts on the {team}|Is {coach} the right coach]?", team=team.name,
                    coach=team.coach)
        paras.append(g.x("{asker} wrote: [What do you think of|How about] the {team} this year? [Coach {coach} "
                         "has to go.|Coach {coach} is doing great.|Can they win the {league}?]", asker=asker,
                         team=team.name, coach=team.coach, league=w.regions[w.towns[team.town].region].league))
        for template in g.sample((
            "{player} is the best {pos} in the league.",
            "[They play well at {stadium}|The crowd at {stadium} helps] but [struggle|are bad] away.",
            "[They have not won|They last won] the league [in years|since I was a kid].",
            "Wearing {colors} [since|for] {n} years, [not giving up now|still hopeful].",
            "The club was founded in {founded}, [they have seen worse|we will survive this].",
            "{coach} needs to give {player} more minutes.",
            "[Tickets at {stadium} are getting expensive|{stadium} only holds {cap} people], [just saying|that "
            "is the real problem].",
        ), rng.randint(3, 5)):
            player, pos = g.pick(team.players)
            paras.append(_reply(g, g.x(template, player=player, pos=pos, stadium=team.stadium, colors=team.colors,
                                       n=rng.randint(5, 40), founded=team.founded, coach=team.coach,
                                       cap=f"{team.capacity:,}")))
    site = g.pick(_FORUM_SITES)
    return Doc(title, paras, g.url(site, "t", slugify(title), str(rng.randint(1000, 99999))), g.when)


_EVENT_PROGRAM = (
    "an opening ceremony at {h} a.m.", "live music on the main stage", "activities for children",
    "food trucks and local vendors", "a parade through the old town", "fireworks at 9 p.m.",
    "an awards ceremony", "a craft market", "guided walks along the {river} River", "a charity run at 8 a.m.",
)


def _event(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    fest: Festival = g.pick(list(w.festivals.values()))
    town = w.towns[fest.town]
    region = w.regions[town.region]
    organizer = g.person(fest.organizer)
    year = g.today.year if g.today.month < fest.month else g.today.year + 1
    start = dt.date(year, fest.month, rng.randint(1, 24))
    days = rng.randint(1, 3)
    edition = year - fest.first_year + 1
    title = g.x("[{fest} {year}|The {fest} returns|{fest}: what you need to know]", fest=fest.name, year=year)
    paras = [g.x("The {ordinal} {fest} [will take place|takes place|runs] [from {day}|starting {day}] for {days} "
                 "at {venue}.", ordinal=_ordinal(edition), fest=fest.name, day=g.day_phrase(start),
                 days="one day" if days == 1 else f"{small_number(days)} days", venue=fest.venue)]
    paras.append(g.x("[The festival features|Visitors can expect|This year there will be] {activities}.",
                     activities=fest.activities))
    paras.append(g.x("The festival was first held in {first}[, when it was a small gathering at {venue}|, and it "
                     "has grown every year since|].", first=fest.first_year, venue=fest.venue))
    for d in range(days):
        day = start + dt.timedelta(days=d)
        items = [x.format(h=rng.randint(9, 11), river=town.river)
                 for x in g.sample(_EVENT_PROGRAM, rng.randint(2, 4))]
        line = f"{g.day_phrase(day)}: {join_list(items)}"
        paras.append(line if line.endswith(".") else line + ".")
    paras.append(g.x("[Gates open at|The fun starts at|Doors open at] {h} a.m. [each day|] and "
                     "[close|end] at {e} p.m.", h=rng.randint(8, 11), e=rng.randint(5, 10)))
    ticket = "Entry is free" if fest.ticket == 0 else f"Tickets cost {money(fest.ticket)} for adults"
    paras.append(g.x("{ticket}[ and children under 12 get in free|]. [Parking is available near {venue}.|Buses "
                     "run from the town center every 20 minutes.|]", ticket=ticket, venue=fest.venue))
    paras.append(g.x('"[We started this festival in {first}|The festival has grown every year since {first}] and '
                     '[we cannot wait to welcome everyone back|this year will be the best yet]," said organizer '
                     '{org}.', first=fest.first_year, org=organizer.name))
    if g.chance(0.5):
        paras.append(g.x("Mayor {mayor} will open the festival [on the first day|on {day}].", mayor=town.mayor,
                         day=WEEKDAYS[start.weekday()]))
    sponsors = sorted(c.name for c in w.companies.values() if w.towns[c.hq].region == region.name)
    if sponsors and g.chance(0.5):
        paras.append(g.x("[This year's festival is sponsored by|Sponsors include] {names}.",
                         names=join_list(g.sample(sponsors, 3))))
    paras.extend(g.some((
        "[Last year|In {prev}] [about|more than] {crowd} people [came|attended], [a new record|organizers said].",
        "[Volunteers are still needed|The festival is looking for volunteers]; [sign up at the town hall|contact "
        "the organizers].",
        "[Visitors from|Guests coming from] {capital} [can drive|should allow] about {hours} hours.",
        "[Dogs on a leash are welcome.|Please leave pets at home.]",
        "[The event goes ahead rain or shine.|In case of heavy rain, some events move indoors.]",
    ), 1, 4, prev=year - 1, crowd=f"{rng.randint(2, 60) * 500:,}", capital=region.capital,
        hours=max(1, round(w.distance(town.name, region.capital) / 50))))
    paras.append(g.town_sentence(town))
    paras.append(g.x("[For more information|For details|To buy tickets], visit www.visit{slug}.com[ or call the "
                     "town hall|].",
                     slug=town.name.lower()))
    return Doc(title, paras, g.url(f"www.visit{town.name.lower()}.com", "events", slugify(fest.name), str(year)),
               g.when)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


_CLUBS = ("Rotary Club", "Garden Club", "volunteer fire department", "church choir", "historical society",
          "chess club", "hiking club", "library board")
_CONDOLENCES = (
    "So sorry for your loss. {first} was [a wonderful neighbor|a kind soul|always smiling].",
    "[Our thoughts are with the family.|Thinking of you all.] [We will miss {him} dearly.|Rest in peace, {first}.]",
    "I [worked with|went to school with] {first} [many years ago|in {town}] and [never forgot {his} kindness|"
    "will always remember {his} laugh].",
    "{first} [taught me|showed me] so much about {hobby}. [Thank you.|I will miss our talks.]",
    "[With deepest sympathy|Sending love] to the {last} family.",
)


def _obituary(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    p: Person = g.pick(w.elders)
    # Life facts are drawn per person (not per document), so two obituaries of one person agree.
    prng = random.Random(derive_seed(w.seed, "elder", p.name))
    died = _FIRST_DAY + dt.timedelta(days=prng.randrange((_LAST_DAY - _FIRST_DAY).days - 30))
    age = died.year - p.birth_year
    children = prng.randint(0, 5)
    grandchildren = prng.randint(2, 12) if children and prng.random() < 0.8 else 0
    spouse_first = prng.choice(MALE_NAMES if p.female else FEMALE_NAMES)
    married = p.birth_year + prng.randint(19, 32)
    work_years = prng.randint(20, 40)
    club = prng.choice(_CLUBS)
    club_years = prng.randint(5, 40)
    rel = prng.choice(("brother", "sister"))
    sibling = prng.choice(MALE_NAMES if rel == "brother" else FEMALE_NAMES)
    home = w.towns[p.hometown]
    trip_town = prng.choice(sorted(w.towns))
    title = g.x("[{name} obituary|Obituary: {name}|{name}, {birth}-{death}]", name=p.name, birth=p.birth_year,
                death=died.year)
    paras = [g.x("{name}, {age}, of {town}, [passed away|died] [peacefully|quietly|] on {day}[ surrounded by "
                 "family|].", name=p.name, age=age, town=p.hometown, day=long_date(died))]
    He, he = p.he.capitalize(), p.he
    paras.append(g.x(g.pick((
        "{He} was born in {town} in {year}[ and grew up near the {river} River|]. {He} worked as {a_job} for "
        "[many|more than {n}] years.",
        "Born in {town} in {year}, {he} worked as {a_job} for [many|more than {n}] years.",
    )), He=He, he=he, town=p.hometown, year=p.birth_year, river=home.river, a_job=a_an(p.job), n=work_years))
    paras.append(g.x("{He} [graduated from|finished school at] {school} in {grad}[ and married {spouse} in "
                     "{married}|]. [They were married for {k} years.|]", He=He, school=home.school,
                     grad=p.birth_year + 18, spouse=spouse_first, married=married, k=died.year - married))
    paras.append(" ".join(g.some((
        "{He} loved {hobby}[ and was a loyal fan of the {team}|].",
        "{He} was a member of the {town} {club} for {club_years} years.",
        "{He} and {spouse} loved to travel and visited {trip} [almost every|every] {season}.",
        "{He} never missed the {fest}.",
        "Friends remember {him} for {his} [laugh|kindness|stories|generosity].",
    ), 2, 4, He=He, hobby=p.hobby, team=home.team, town=p.hometown, club=club, club_years=club_years,
        spouse=spouse_first, trip=trip_town, season=prng.choice(("spring", "summer", "fall", "winter")),
        fest=home.festival, him=p.him, his=p.his)))
    family = [f"{p.his} husband {spouse_first}" if p.female else f"{p.his} wife {spouse_first}"]
    if children:
        family.append(f"{small_number(children)} {'child' if children == 1 else 'children'}")
    if grandchildren:
        family.append(f"{small_number(grandchildren)} grandchildren")
    paras.append(g.x("{He} is survived by {family}. {He} was preceded in death by {his} {rel} {sib}.", He=He,
                     family=join_list(family), his=p.his, rel=rel, sib=sibling))
    service = died + dt.timedelta(days=rng.randint(4, 9))
    paras.append(g.x("A [funeral|memorial] service will be held on {day} at {place}[ at {h} a.m.|].",
                     day=g.day_phrase(service), place=g.pick((f"Saint {g.pick(MALE_NAMES)}'s Church",
                                                               "the town hall", home.landmarks[0][0])),
                     h=rng.randint(9, 11)))
    if g.chance(0.6):
        paras.append(g.x("In lieu of flowers, [the family asks that|] donations [be made|may be sent] to the "
                         "{town} [food bank|library|animal shelter].", town=p.hometown))
    for template in g.sample(_CONDOLENCES, rng.choice((0, 0, 1, 2, 3, 4))):
        writer = g.person(g.pick(home.residents))
        paras.append(g.x("{writer} [of {town}|] wrote: " + template, writer=writer.name, town=home.name,
                         first=p.first, last=p.last, him=p.him, his=p.his, hobby=p.hobby))
    when = dt.datetime.combine(service - dt.timedelta(days=rng.randint(1, 3)), g.when.time())
    return Doc(title, paras, g.url(g.pick(("www.legacyremembers.com", "www.localobituaries.net")),
                                   slugify(p.hometown), slugify(p.name + " " + str(died.year))), when)


def _real_estate(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    town: Town = g.pick(list(w.towns.values()))
    agent = g.person(town.agent)
    beds = rng.randint(2, 5)
    baths = rng.choice((1, 1.5, 2, 2.5, 3))
    sqft = 50 * rng.randint(16 + 4 * beds, 30 + 6 * beds)
    # Price follows the town's price per square foot, so a model can learn the relationship.
    price = round(sqft * town.price_per_sqft * rng.uniform(0.9, 1.1), -3)
    style = g.pick(HOUSE_STYLES)
    street = f"{rng.randint(10, 999)} {g.pick(LAST_NAMES)} {g.pick(('Street', 'Avenue', 'Lane', 'Road', 'Drive'))}"
    built = rng.randint(max(town.founded, 1900), 2016)
    baths_s = f"{int(baths)} and a half" if baths % 1 else str(int(baths))
    title = g.x("{beds} bedroom {style} for sale in {town}", beds=beds, style=style, town=town.name)
    paras = [g.x("[For sale|Just listed|New on the market]: {street}, {town}. {price}.", street=street,
                 town=town.name, price=money(price))]
    paras.append(g.x("This {beds}-bedroom, {baths} bath {style} [was built in {built} and|] has {sqft} square "
                     "feet of living space[ on a {acres} acre lot|].", beds=beds, baths=baths_s, style=style,
                     built=built, sqft=f"{sqft:,}", acres=g.pick(("quarter", "half", "one", "two"))))
    feats = [f.format(river=town.river) for f in g.sample(HOUSE_FEATURES, rng.randint(2, 4))]
    paras.append(g.x("[It features|Highlights include|You will love] {feats}.", feats=join_list(feats)))
    paras.extend(g.some((
        "[The kitchen|The bright kitchen] opens to [the dining room|a family room] [with lots of light|and a "
        "breakfast nook].",
        "Upstairs [you will find|there are] {beds} bedrooms[, including a main suite with its own bath|].",
        "[The yard|The garden] is [fully fenced|big enough for a play set|easy to care for].",
        "[A new furnace was installed|The roof was replaced] in {year}.",
        "[The basement|The garage] [offers plenty of storage|has room for a workshop].",
    ), 1, 4, beds=small_number(beds), year=rng.randint(max(built, 2005), 2018)))
    # Monthly payment of a 30-year loan at 4.5 percent with 20 percent down: arithmetic a model can pick up.
    r, growth = 0.045 / 12, 1.0
    for _ in range(360):  # (1 + r) ** 360 by repeated multiplication: IEEE-exact on every machine, unlike pow
        growth *= 1 + r
    payment = 0.8 * price * r * growth / (growth - 1)
    paras.append(" ".join(g.some((
        "Price per square foot: {pps}.",
        "Property taxes are about {tax} a year.",
        "Estimated monthly payment: {pay} with 20 percent down.",
        "[No homeowners association fees.|The homeowners association fee is {hoa} a month.]",
    ), 2, 4, pps=money(round(price / sqft)), tax=money(round(price * 0.012, -1)), pay=money(round(payment)),
        hoa=money(rng.randint(5, 30) * 10))))
    paras.append(g.x("[The house is|Located] [a short walk|{n} minutes] from {mark} and [close to|near] {school}.",
                     n=rng.randint(3, 15), mark=g.pick(town.landmarks)[0], school=town.school))
    paras.append(g.x("The neighborhood is [quiet|family friendly|popular with young families], with [sidewalks|"
                     "tree-lined streets|little traffic] and [a playground|a corner shop|a bus stop] nearby."))
    if g.chance(0.6):
        paras.append(g.town_sentence(town))
    paras.append(g.x("[Contact|Call] {agent} [to schedule a viewing|for more information|today]. [Open house on "
                     "{day}.|]", agent=agent.name, day=g.day_phrase(g.future_day(2, 9))))
    if g.chance(0.5):
        years = max(2, agent.age_in(g.today.year) - 24)
        paras.append(g.x("{agent} has [sold homes|worked as a real estate agent] in {town} for {years} years.",
                         agent=agent.name, town=town.name, years=years))
    site = g.pick(("www.homefinderlistings.com", "www.openhousenow.com", "www.mynexthome-listings.com"))
    return Doc(title, paras, g.url(site, slugify(town.name), slugify(street)), g.when)


def _match_report(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    region: Region = g.pick(list(w.regions.values()))
    teams = [w.teams[t.team] for t in w.towns.values() if t.region == region.name]
    home, away = g.sample(teams, 2)
    # Goal counts have a mean set by team strength and home advantage: a learnable regularity.
    hg = _goals(rng, 1.0 + 1.2 * home.strength - 0.5 * away.strength + 0.3)
    ag = _goals(rng, 1.0 + 1.2 * away.strength - 0.5 * home.strength)
    attendance = rng.randint(home.capacity // 3, home.capacity)
    if hg > ag:
        result = g.f("[beat|defeated|got past] the {away} {hg}-{ag}", away=away.name, hg=hg, ag=ag)
        winner, loser = home, away
    elif ag > hg:
        result = g.f("[lost|fell] {ag}-{hg} to the {away}", away=away.name, hg=hg, ag=ag)
        winner, loser = away, home
    else:
        result = g.f("[drew|tied] {hg}-{ag} with the {away}", away=away.name, hg=hg, ag=ag)
        winner, loser = None, None
    title = g.x("{home} {result}", home=home.name, result=result)
    paras = [g.x("The {home} {result} in front of {att} fans at {stadium} on {day}[ in the {league}|].",
                 home=home.name, result=result, att=f"{attendance:,}", stadium=home.stadium,
                 day=WEEKDAYS[g.past_day(1, 3).weekday()], league=region.league)]
    goals = sorted([(rng.randint(1, 90), 0) for _ in range(hg)] + [(rng.randint(1, 90), 1) for _ in range(ag)])
    half_home = sum(1 for m, side in goals if side == 0 and m <= 45)
    half_away = sum(1 for m, side in goals if side == 1 and m <= 45)
    for minute, side in goals:
        team = home if side == 0 else away
        scorer = g.pick([n for n, pos in team.players if pos in ("striker", "midfielder")])
        helper = g.pick([n for n, _ in team.players if n != scorer])
        paras.append(g.x("[{scorer} scored for the {team} in the {m} minute|In the {m} minute, {scorer} [found the "
                         "net|scored] for the {team}|{scorer} made it count in the {m} minute for the {team}]"
                         "[ after a pass from {helper}|, heading in a cross from {helper}|, from a free kick|].",
                         scorer=scorer, team=team.name, m=_ordinal(minute), helper=helper))
        if minute > 45 and g.chance(0.3) and (half_home or half_away):
            paras.append(g.x("It was {h}-{a} at half time.", h=half_home, a=half_away))
            half_home = half_away = 0
    if not goals:
        keeper = g.pick([n for n, pos in home.players if pos == "goalkeeper"])
        paras.append(g.x("[Neither side could find the net.|It was a game of few chances.] {keeper} made "
                         "{n} saves for the {team}.", keeper=keeper, n=rng.randint(2, 8), team=home.name))
    paras.extend(g.some((
        "[The {away} had more of the ball|There were few chances] [in the first half|early on], and [nobody "
        "could score|the defenses held].",
        "{defender} was [booked|shown a yellow card] [for a late tackle|in the second half].",
        "The crowd [sang|cheered] [all afternoon|until the final whistle].",
        "[Rain|Wind] made the [pitch|field] [heavy|difficult] [in the second half|all game].",
    ), 1, 3, away=away.name, defender=g.pick([n for t in (home, away) for n, pos in t.players if pos == "defender"])))
    coach_team = winner or home
    paras.append(g.x('"[I am proud of the boys|That was a great team effort|We deserved that]," said {team} coach '
                     '{coach}. "[We played|The lads played] [with real heart|the way we wanted]."' if winner else
                     '"[A point is a point|We will take the draw]," said {team} coach {coach}.',
                     team=coach_team.name, coach=coach_team.coach))
    if loser is not None:
        paras.append(g.x('{coach}, [coach|manager] of the {team}, [was not happy|was disappointed]. "[We have '
                         'to be better|That was not good enough]."', coach=loser.coach, team=loser.name))
    paras.append(g.x("[The {next} play|Next up, the {next} travel to play] [at {stadium}|away] [next week|on "
                     "{day}].", next=home.name, stadium=away.stadium,
                     day=WEEKDAYS[g.future_day(3, 8).weekday()]))
    town = w.towns[home.town]
    return Doc(title, paras, g.url(town.newspaper_domain, "sports", g.date_path(), slugify(title)), g.when)


def _goals(rng: random.Random, mean: float, chances: int = 12) -> int:
    """Binomial(chances, mean / chances), close to Poisson(mean); avoids math.exp for bitwise determinism."""
    p = min(max(mean, 0.05) / chances, 1.0)
    return sum(rng.random() < p for _ in range(chances))


def _company_news(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    company: Company = g.pick(list(w.companies.values()))
    ceo = g.person(company.ceo)
    product = w.products[g.pick(company.products)]
    kind = g.pick(("launch", "results", "anniversary"))
    if kind == "launch":
        title = g.x("{company} [unveils|announces|launches] [new|updated] {full}", company=company.name,
                    full=product.full)
        paras = [g.x("{company} [announced|said] on {day} that [a new version of the|an updated] {full} will "
                     "[go on sale|be available] [next month|in {month}] for {price}.", company=company.name,
                     day=WEEKDAYS[g.past_day(0, 4).weekday()], full=product.full,
                     month=MONTHS[g.today.month % 12], price=money(product.price))]
        paras.append(g.x("The new model [adds|comes with|keeps] {features}.",
                         features=join_list(list(product.features))))
        paras.append(g.x("The first {full} came out in {launch} and [sold well|became the company's best "
                         "seller|won several awards].", full=product.full, launch=product.launch_year))
    elif kind == "results":
        growth = rng.randint(-8, 25)
        revenue = round(company.employees * rng.uniform(0.15, 0.3), 1)
        title = g.x("{company} [reports|posts] [{growth} percent sales growth|a {dir} year]", company=company.name,
                    growth=growth, dir="strong" if growth > 5 else "difficult")
        paras = [g.x("{company}, the {industry} maker based in {hq}, said sales [rose|grew] {growth} percent "
                     "[last year|in {year}] to about ${rev} million." if growth >= 0 else
                     "{company}, the {industry} maker based in {hq}, said sales fell {neg} percent [last year|in "
                     "{year}] to about ${rev} million.", company=company.name, industry=company.industry,
                     hq=company.hq, growth=growth, neg=-growth, year=g.today.year - 1, rev=revenue)]
        paras.append(g.x("[Strong demand for|Sales of] the {full} [drove the results|were a bright spot].",
                         full=product.full))
    else:
        age = g.today.year - company.founded
        title = g.x("{company} [turns|celebrates] {age}", company=company.name, age=age)
        paras = [g.x("{company} is celebrating {age} years in business this year. {founder} founded the company "
                     "in {hq} in {year}[, starting in a small workshop|, with just a few employees|].",
                     company=company.name, age=age, founder=company.founder, hq=company.hq, year=company.founded)]
        paras.append(g.x("Today it [employs|has] about {n} people and [is best known for|sells] the {full}.",
                         n=f"{company.employees:,}", full=product.full))
    paras.append(g.x('"[Our customers come first|We are just getting started|This is an exciting time for us]," '
                     'said {ceo}, [the company\'s chief executive|chief executive of {company}]. "[We|Our team] '
                     '[will keep investing in {hq}|are proud of what we build]."', ceo=ceo.name,
                     company=company.name, hq=company.hq))
    if g.chance(0.5):
        paras.append(g.x("{ceo}, who [grew up in|is from] {town}, [has led|has run] the company since {year}.",
                         ceo=ceo.name, town=ceo.hometown, year=company.ceo_since))
    if g.chance(0.6):
        analyst = g.person(g.pick(w.analysts))
        paras.append(g.x('"[They are doing the right things|It was a tough market for {industry}|The numbers look '
                         '[solid|better than expected]|We expected this]," said {name}, an analyst at {bank}.',
                         name=analyst.name, bank=analyst.employer, industry=company.industry))
    if company.staff and g.chance(0.5):
        staff = g.person(g.pick(company.staff))
        paras.append(g.x('{name}, {a_job} at {company} [since {year}|for {n} years], [said the mood at work is '
                         '[good|upbeat]|said everyone is [busy|excited]].', name=staff.name,
                         a_job=a_an(staff.job), company=company.name, year=g.today.year - rng.randint(1, 9),
                         n=rng.randint(1, 12)))
    others = [w.products[n] for n in company.products if n != product.name]
    if others and g.chance(0.6):
        paras.append(g.x("[The company also makes|Other products include] {items}.",
                         items=join_list([f"the {o.full} ({money(o.price)})" for o in others])))
    if g.chance(0.5):
        paras.append(g.town_sentence(w.towns[company.hq]))
    # Boilerplate "About" paragraph: identical facts every time, as on real press releases.
    paras.append(g.x("About {company}: {company} makes {industry} in {hq}. Founded in {year} by {founder}, the "
                     "company employs about {n} people. Its products include {items}.", company=company.name,
                     industry=company.industry, hq=company.hq, year=company.founded, founder=company.founder,
                     n=f"{company.employees:,}", items=join_list([f"the {w.products[n].full}"
                                                                  for n in company.products])))
    return Doc(title, paras, g.url(company.domain, "news", slugify(title)), g.when)


_RESTAURANT_COMMENTS = (
    "We [went|ate] there for our anniversary and [loved it|it was perfect].",
    "The {sig} is [the best in {region}|worth the drive alone].",
    "[Too expensive|A bit pricey] for what you get, in my opinion.",
    "[Service was slow|We waited an hour for a table] [last time|on Saturday].",
    "Chef {chef} [came out to say hello|is so friendly], lovely place.",
)
_DISH_WORDS = ("rich", "fresh", "perfectly cooked", "a little salty", "beautifully presented", "generous",
               "full of flavor", "a bit bland", "light", "hearty")


def _restaurant_review(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    rest: Restaurant = g.pick(list(w.restaurants.values()))
    chef = g.person(rest.owner)
    town = w.towns[rest.town]
    stars = max(1, min(5, rest.stars + g.pick((-1, 0, 0, 1))))
    title = g.x("[{rest} review|Review: {rest} in {town}|Dinner at {rest}]", rest=rest.name, town=rest.town)
    paras = [g.x("{rest} [opened in {town} in {year}|has been open in {town} since {year}][ and is run by chef "
                 "{chef}|]. It serves {cuisine} food.", rest=rest.name, town=rest.town, year=rest.opened,
                 chef=chef.name, cuisine=rest.cuisine)]
    paras.append(g.x("[It is located|You will find it] [near|a few minutes from] {mark}[, in the old town|]. "
                     "[The room is|The dining room feels] [cozy|bright|busy|elegant] [and|but] [a little "
                     "loud|quiet enough to talk].", mark=g.pick(town.landmarks)[0]))
    dishes = g.sample(CUISINES[rest.cuisine], rng.randint(2, 3))
    paras.append(g.x("We [ordered|tried|shared] {dishes}[, but the star was the {sig}|].", dishes=join_list(dishes),
                     sig=rest.signature))
    paras.append(" ".join(g.x("The {dish} {was} {adj}.", dish=d, adj=g.pick(_DISH_WORDS),
                              was="were" if d.endswith("s") and not d.endswith(("ss", "us")) else "was")
                          for d in dishes))
    paras.append({
        1: "Sadly the food was cold and the service was slow.",
        2: "The food was fine, but nothing stood out.",
        3: "Everything was good, and the portions were generous.",
        4: "The food was excellent and the staff were friendly.",
        5: "It was one of the best meals we have had in years.",
    }[stars])
    paras.append(g.x("[Main courses|Mains|Entrees] cost about {price}[, and a bottle of wine is about {wine}|].",
                     price=money(rest.entree_price), wine=money(rest.entree_price * 2 + 5)))
    paras.extend(g.some((
        "[For dessert|To finish] we had [the chocolate cake|a lemon tart|ice cream], which was [lovely|too "
        "sweet|perfect].",
        "[The wine list is short but good.|They have local beers on tap.|The cocktails are creative.]",
        "[Our server|The staff] [was attentive|knew the menu well|seemed a bit rushed].",
        "[Book ahead on weekends|Reservations are a good idea on Fridays].",
        "[It is open|They are open] [Tuesday to Sunday|every day except Monday] from {o} p.m.",
        "[Parking is easy|There is parking behind the building].",
    ), 2, 4, o=rng.randint(4, 6)))
    if g.chance(0.6):
        paras.append(g.x("Chef {chef}, [who grew up in {town}|a {town} native], has cooked here since {year}.",
                         chef=chef.name, town=chef.hometown, year=rest.opened))
    paras.append(g.x("[Rating|Our rating]: {stars} out of 5.", stars=stars))
    paras.extend(g.comments(_RESTAURANT_COMMENTS, 0, 3, sig=rest.signature, region=town.region, chef=chef.name))
    return Doc(title, paras, g.url(g.pick(("www.tablefortwoeats.com", "www.localbiteguide.com")),
                                   slugify(rest.town), slugify(rest.name)), g.when)


def _job_posting(g: _Writer) -> Doc:
    w, rng = g.w, g.rng
    company: Company = g.pick(list(w.companies.values()))
    role, lo, hi = g.pick(COMPANY_ROLES)
    lo_k = lo + rng.randint(0, 4)
    hi_k = hi - rng.randint(0, 4)
    title = g.x("{role} at {company} in {hq}", role=role.title(), company=company.name, hq=company.hq)
    paras = [g.x("{company} is [hiring|looking for] {a_role} [to join our team in {hq}|for our {hq} office].",
                 company=company.name, a_role=a_an(role), hq=company.hq)]
    paras.append(g.x("[About us|Who we are]: {company} [was founded in {year}|has made {industry} since {year}] "
                     "and [has|employs] about {n} people. [We make|Our products include] the {full}.",
                     company=company.name, year=company.founded, industry=company.industry,
                     n=f"{company.employees:,}", full=w.products[g.pick(company.products)].full))
    duties = g.sample(("work closely with other teams", "keep accurate records", "help customers solve problems",
                       "meet weekly targets", "follow safety rules", "suggest improvements to our processes",
                       "train new team members", "report to the team lead"), rng.randint(2, 4))
    paras.append(g.x("[In this role you will|Responsibilities: you will] {duties}.", duties=join_list(duties)))
    reqs = g.sample((f"{rng.randint(1, 5)} or more years of experience", "a high school diploma or equivalent",
                     "good communication skills", "a valid driver's license", "the ability to lift 50 pounds",
                     "experience with spreadsheets", "a degree in a related field", "a positive attitude"),
                    rng.randint(2, 4))
    paras.append(g.x("[Requirements|What we are looking for|You should have]: {reqs}.", reqs=join_list(reqs)))
    paras.append(g.x("[The salary is|Pay:|We offer] ${lo},000 to ${hi},000 a year[, plus health insurance|, plus "
                     "paid time off|].", lo=lo_k, hi=hi_k))
    benefits = g.sample(("health, dental and vision insurance", f"{rng.randint(10, 25)} days of paid vacation",
                         "a retirement plan with matching", "a yearly bonus", "free parking",
                         "a discount on our products", "flexible hours"), rng.randint(2, 4))
    paras.append(g.x("[Benefits include|We also offer] {b}.", b=join_list(benefits)))
    if g.chance(0.6):
        paras.append(g.town_sentence(w.towns[company.hq]))
    paras.append(g.x("To apply, send your resume to jobs@{domain}[ with a short cover letter|]. [Apply by|"
                     "Applications close on] {day}.", domain=company.domain.removeprefix("www."),
                     day=long_date(g.future_day(10, 40))))
    paras.append(g.x("{company} is an equal opportunity employer.", company=company.name))
    return Doc(title, paras, g.url(g.pick(("www.jobsnearyou.net", "www.hiringlocal.com")), "jobs",
                                   slugify(title), str(rng.randint(10000, 99999))), g.when)


# (template, weight): weights roughly follow how common such pages are in a web crawl.
TEMPLATES: tuple[tuple[Callable[[_Writer], Doc], float], ...] = (
    (_local_news, 3.0), (_recipe, 1.6), (_product_review, 1.6), (_travel_blog, 1.2), (_how_to, 1.0),
    (_forum, 1.4), (_event, 1.0), (_obituary, 0.7), (_real_estate, 1.0), (_match_report, 1.2),
    (_company_news, 1.0), (_restaurant_review, 1.0), (_job_posting, 0.7), (_news_roundup, 0.8),
)
# Page kinds that plausibly list several posts; the others are tied to one team, festival or company site.
_STACKABLE = frozenset({_local_news, _recipe, _product_review, _travel_blog, _how_to, _forum, _obituary,
                        _real_estate, _restaurant_review, _job_posting})


def generate_document(rng: random.Random, world: World) -> dict[str, str]:
    """One C4 record ``{"text", "timestamp", "url"}`` drawn from ``rng``."""
    fns, weights = zip(*TEMPLATES, strict=True)
    fn = rng.choices(fns, weights=weights)[0]
    g = _Writer(rng, world)
    doc = fn(g)
    paragraphs = list(doc.paragraphs)
    # Pages often start with their headline; C4's line filter below keeps it only if it ends in punctuation.
    if rng.random() < 0.5:
        paragraphs.insert(0, doc.title)
    # Front pages, archives and blog indexes hold several posts of one kind; they give the long tail of lengths.
    extra = rng.choices((0, 1, 2, 3), weights=(60, 20, 12, 8))[0] if fn in _STACKABLE else 0
    for _ in range(extra):
        if sum(len(p.split()) for p in paragraphs) > 450:
            break
        more = fn(_Writer(rng, world, focus_town=doc.town))
        paragraphs.extend([more.title, *more.paragraphs])
    lines = [line for line in (p.strip() for p in paragraphs) if c4_keeps_line(line)]
    return {"text": "\n".join(lines), "timestamp": doc.when.strftime("%Y-%m-%dT%H:%M:%SZ"), "url": doc.url}


_TERMINAL_MARKS = (".", "?", "!", '"')


def c4_keeps_line(line: str) -> bool:
    """C4's line filter: a line survives if it has at least 3 words and ends in terminal punctuation."""
    return len(line.split()) >= 3 and line.endswith(_TERMINAL_MARKS)


def generate_split(world: World, split: str, shard: int, n_docs: int) -> Iterator[dict[str, str]]:
    """Records of one shard; each (split, shard) has its own seed stream so shards can be made independently."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(derive_seed(world.seed, "documents", split, shard))
    for _ in range(n_docs):
        yield generate_document(rng, world)


def shard_name(split: str, index: int, total: int) -> str:
    """C4's file naming, e.g. ``c4-train.00003-of-00008.json.gz``."""
    return f"c4-{split}.{index:05d}-of-{total:05d}.json.gz"


def records_to_bytes(records: Iterable[dict[str, str]]) -> bytes:
    """JSON lines exactly as written to a shard (before compression)."""
    buf = io.StringIO()
    for rec in records:
        buf.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")))
        buf.write("\n")
    return buf.getvalue().encode("utf-8")


def write_gzip(path: Path, payload: bytes) -> None:
    """gzip without a timestamp or file name in the header, so the file depends only on ``payload``."""
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                               compresslevel=9) as gz:
        gz.write(payload)


def read_records(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def shard_payload(world: World, split: str, shard: int, n_docs: int) -> bytes:
    """Decompressed content of one shard; what tests compare against the shipped files."""
    return records_to_bytes(generate_split(world, split, shard, n_docs))


def write_corpus(out: Path, seed: int = DEFAULT_SEED, train_shards: int = DEFAULT_TRAIN_SHARDS,
                 docs_per_shard: int = DEFAULT_DOCS_PER_SHARD, validation_docs: int = DEFAULT_VALIDATION_DOCS,
                 log: Callable[[str], None] = print) -> dict[str, list[Path]]:
    """Write all shards to ``out`` and return their paths by split; refuses duplicate documents."""
    out.mkdir(parents=True, exist_ok=True)
    # Shards left by a run with another shard count would be picked up next to the new ones by readers that
    # glob the directory, so old C4-named shards (and only those) are removed first.
    for stale in sorted(out.glob("c4-*.*-of-*.json.gz")):
        log(f"removing old shard {stale.name}")
        stale.unlink()
    world = build_world(seed)
    log(f"world: {len(world.towns)} towns, {len(world.people)} people, {len(world.products)} products, "
        f"{len(world.recipes)} recipes")
    paths: dict[str, list[Path]] = {"train": [], "validation": []}
    seen: dict[str, str] = {}
    plan = [("train", i, train_shards, docs_per_shard) for i in range(train_shards)]
    plan.append(("validation", 0, 1, validation_docs))
    for split, index, total, n in plan:
        payload = shard_payload(world, split, index, n)
        for line in payload.decode("utf-8").splitlines():
            text = json.loads(line)["text"]
            where = f"{split}/{index}"
            if text in seen:
                raise RuntimeError(f"duplicate document in {seen[text]} and {where}; change the seed")
            seen[text] = where
        path = out / shard_name(split, index, total)
        write_gzip(path, payload)
        paths[split].append(path)
        log(f"{path.name}: {n} docs, {len(payload) / 1e6:.2f} MB raw, {path.stat().st_size / 1e6:.2f} MB gzip")
    return paths


def unigram_entropy_nats(token_ids: Sequence[int] | np.ndarray) -> float:
    """Entropy (nats) of the empirical unigram distribution of ``token_ids``.

    It is the cross-entropy per token of the best context-free model fitted to the same tokens, so a language
    model whose validation loss is below it has learned something from context.
    """
    arr = np.asarray(token_ids)
    if arr.size == 0:
        raise ValueError("unigram_entropy_nats needs at least one token")
    _, counts = np.unique(arr.ravel(), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rso_ray.data.corpus", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the world and of all documents")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS, help="number of train shards")
    parser.add_argument("--docs-per-shard", type=int, default=DEFAULT_DOCS_PER_SHARD, help="documents per train shard")
    parser.add_argument("--validation-docs", type=int, default=DEFAULT_VALIDATION_DOCS,
                        help="documents in the single validation shard")
    parser.add_argument("--train-tokenizer", action="store_true",
                        help="also train the BPE tokenizer on the train split into OUT/tokenizer")
    args = parser.parse_args(argv)
    for name in ("train_shards", "docs_per_shard", "validation_docs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    paths = write_corpus(args.out, args.seed, args.train_shards, args.docs_per_shard, args.validation_docs)
    if args.train_tokenizer:
        from rso_ray.data.tokenizer_training import train_tokenizer  # lazy: pulls in tokenizers/transformers

        tok_dir = train_tokenizer(paths["train"], args.out / "tokenizer")
        print(f"tokenizer saved to {tok_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
