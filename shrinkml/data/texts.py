"""``builtin:texts``: a default English text set generated at run time (no download).

A seeded template grammar over a few hundred words across topics (science, travel, food, sport,
technology, health, finance, nature, history, music) writes questions, statements and longer
compound sentences. Output is deterministic for a seed; the sentences are varied enough for
embedding-fidelity checks (nearest neighbours, cosine), not for training.

>>> texts = generate_texts(2000, seed=0)  # doctest: +SKIP
>>> len(set(texts)) > 1900  # doctest: +SKIP
True
"""

from __future__ import annotations

import numpy as np

_TOPICS: dict[str, dict[str, list[str]]] = {
    "science": {
        "nouns": ["the experiment", "a telescope", "the new theory", "the chemical reaction", "a research team",
                  "the microscope", "the particle detector", "the laboratory", "a young physicist", "the climate model"],
        "verbs": ["measured", "confirmed", "challenged", "predicted", "observed", "explained", "tested", "revealed"],
        "objects": ["the speed of light", "a distant galaxy", "the structure of proteins", "dark matter",
                    "the melting point of ice", "an unknown bacterium", "gravitational waves", "ocean currents"],
    },
    "travel": {
        "nouns": ["the train", "our flight", "the tour guide", "a small hotel", "the ferry", "my cousin",
                  "the travel agency", "a backpacker", "the night bus", "the mountain village"],
        "verbs": ["reached", "left", "booked", "recommended", "crossed", "visited", "avoided", "found"],
        "objects": ["the old harbour", "a quiet beach", "the border", "the capital city", "a cheap hostel",
                    "the famous cathedral", "the airport", "a crowded market"],
    },
    "food": {
        "nouns": ["the chef", "my grandmother", "the bakery", "a food critic", "the new restaurant",
                  "the street vendor", "our neighbour", "the cooking class", "the kitchen staff", "a farmer"],
        "verbs": ["cooked", "baked", "tasted", "served", "seasoned", "grilled", "prepared", "praised"],
        "objects": ["fresh bread", "a spicy curry", "the vegetable soup", "chocolate cake", "grilled fish",
                    "homemade pasta", "a bowl of rice", "the lemon tart"],
    },
    "sport": {
        "nouns": ["the goalkeeper", "the home team", "a marathon runner", "the coach", "the tennis player",
                  "the referee", "the young striker", "the cycling team", "the swimmer", "the captain"],
        "verbs": ["won", "lost", "defended", "scored in", "trained for", "dominated", "missed", "celebrated"],
        "objects": ["the final match", "the championship", "a penalty kick", "the relay race", "the season opener",
                    "the world record", "the semi-final", "the away game"],
    },
    "technology": {
        "nouns": ["the software update", "a startup", "the engineer", "the new phone", "the database",
                  "the search engine", "a security researcher", "the robot", "the cloud service", "the compiler"],
        "verbs": ["crashed", "improved", "replaced", "encrypted", "downloaded", "optimized", "broke", "indexed"],
        "objects": ["the user data", "the battery life", "a critical bug", "the web server", "the network traffic",
                    "the login page", "millions of records", "the source code"],
    },
    "health": {
        "nouns": ["the doctor", "a nurse", "the patient", "the hospital", "the new vaccine", "a physiotherapist",
                  "the clinic", "the health ministry", "my dentist", "the pharmacist"],
        "verbs": ["treated", "prevented", "diagnosed", "reduced", "monitored", "prescribed", "eased", "studied"],
        "objects": ["the fever", "a broken arm", "high blood pressure", "the flu outbreak", "chronic back pain",
                    "the sleep problems", "an allergy", "the recovery"],
    },
    "finance": {
        "nouns": ["the central bank", "an investor", "the stock market", "the accountant", "the company",
                  "a small business", "the tax office", "the pension fund", "the economist", "my landlord"],
        "verbs": ["raised", "cut", "invested in", "borrowed", "lost", "reported", "doubled", "audited"],
        "objects": ["interest rates", "the quarterly profits", "a large loan", "the monthly rent", "government bonds",
                    "the annual budget", "foreign currency", "the shares"],
    },
    "nature": {
        "nouns": ["the river", "a storm", "the forest", "an old oak tree", "the wolves", "the glacier",
                  "a flock of birds", "the volcano", "the farmers", "the wind"],
        "verbs": ["flooded", "destroyed", "covered", "crossed", "surrounded", "shaped", "fed", "damaged"],
        "objects": ["the valley", "the small island", "the wheat fields", "the coastline", "the snowy peaks",
                    "the wetlands", "the desert", "the meadow"],
    },
    "history": {
        "nouns": ["the emperor", "the ancient city", "a historian", "the revolution", "the army",
                  "the medieval castle", "the explorers", "the treaty", "the museum", "the archaeologists"],
        "verbs": ["conquered", "rebuilt", "discovered", "abandoned", "described", "defended", "excavated", "ruled"],
        "objects": ["the old empire", "a buried temple", "the northern provinces", "the royal palace",
                    "the trade routes", "a lost manuscript", "the city walls", "the colonies"],
    },
    "music": {
        "nouns": ["the orchestra", "a jazz pianist", "the band", "the singer", "the conductor", "the choir",
                  "a street musician", "the drummer", "the composer", "the festival crowd"],
        "verbs": ["played", "recorded", "wrote", "performed", "rehearsed", "sang", "remixed", "cheered for"],
        "objects": ["a new symphony", "the old folk song", "their first album", "the encore", "a slow ballad",
                    "the opening act", "a violin concerto", "the national anthem"],
    },
}
_TIMES = ["yesterday", "last week", "this morning", "in 1998", "every summer", "after the holidays",
          "before dawn", "two years ago", "on Sunday", "during the winter", "recently", "at midnight"]
_PLACES = ["in Paris", "near the coast", "in a small town", "in the north", "at the university", "downtown",
           "in the countryside", "abroad", "in Tokyo", "on the island", "in the city centre", "at home"]
_ADVERBS = ["quickly", "carefully", "surprisingly", "finally", "slowly", "easily", "almost", "openly"]
_ADJECTIVES = ["remarkable", "disappointing", "unexpected", "difficult", "important", "strange", "beautiful",
               "expensive", "ordinary", "controversial"]
_CONNECTORS = ["because", "although", "while", "even though", "so", "but", "and then", "since"]
_QUESTION_STARTS = ["Why", "How", "When", "Where"]
_OPINIONS = ["I think", "Many people believe", "Experts say", "Nobody expected that", "It seems",
             "The report claims", "My friend told me", "Everyone agrees"]


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _clause(rng: np.random.Generator, topic: dict[str, list[str]]) -> str:
    return f"{_pick(rng, topic['nouns'])} {_pick(rng, topic['verbs'])} {_pick(rng, topic['objects'])}"


def _sentence(rng: np.random.Generator) -> str:
    topic = _TOPICS[_pick(rng, sorted(_TOPICS))]
    form = int(rng.integers(7))
    if form == 0:  # short statement
        s = f"{_clause(rng, topic)}."
    elif form == 1:  # statement with time and place
        s = f"{_clause(rng, topic)} {_pick(rng, _PLACES)} {_pick(rng, _TIMES)}."
    elif form == 2:  # wh-question
        noun, verb, obj = _pick(rng, topic["nouns"]), _pick(rng, topic["verbs"]), _pick(rng, topic["objects"])
        s = f"{_pick(rng, _QUESTION_STARTS)} {noun} {verb} {obj}?"
    elif form == 3:  # yes/no question
        s = f"Did {_pick(rng, topic['nouns'])} really say that {_clause(rng, topic)}?"
    elif form == 4:  # opinion
        s = f"{_pick(rng, _OPINIONS)} {_clause(rng, topic)} {_pick(rng, _ADVERBS)}."
    elif form == 5:  # long compound sentence, possibly mixing topics
        other = _TOPICS[_pick(rng, sorted(_TOPICS))]
        s = (f"{_clause(rng, topic)} {_pick(rng, _TIMES)}, {_pick(rng, _CONNECTORS)} {_clause(rng, other)}"
             f" {_pick(rng, _PLACES)}, which was {_pick(rng, _ADJECTIVES)}.")
    else:  # evaluative
        s = f"It was {_pick(rng, _ADJECTIVES)} that {_clause(rng, topic)} {_pick(rng, _TIMES)}."
    return s[0].upper() + s[1:]


def generate_texts(n: int = 2000, *, seed: int = 0) -> list[str]:
    """``n`` distinct English sentences (as far as the grammar allows), deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    out: list[str] = []
    attempts = 0
    while len(out) < n and attempts < 20 * n:
        attempts += 1
        s = _sentence(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
