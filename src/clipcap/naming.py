"""Does a caption name the object its reference names? The "names the object" measure of evaluation.

A reference's **head noun** is the noun its first noun phrase is about: the caption is cut at the first
clause break (a comma, a bracket, a dash, the sentence's end), then at the first preposition, conjunction,
relative pronoun or verb; the last word left is the head ("A Tamworth pig in the mud." -> pig, "Two cats
sleeping on a couch." -> cat). A quantity or container word followed by "of" hands the head on to what
follows ("a bunch of grapes" -> grape, "a cup of coffee" -> coffee). Words are compared as lemmas (plurals
to singulars by English spelling rules and a list of irregular plurals), whole words only ("catapult" does
not name a cat).

:func:`names_object` is True when any word of the caption has the lemma of the reference's head noun.
:func:`caption_nouns` gives the head of every phrase of a caption ("A girl riding a horse." -> girl, horse):
the entities an entity-aware captioner is trained to name.
The rules are plain English morphology, no tagger: they are meant for the short, one-phrase captions of
image datasets (Tux Paint, Open Clip Art, COCO), and are unit-tested on hand-made cases.
"""

from __future__ import annotations

import re

CLAUSE_BREAK = re.compile(r"[,;:()\[\]!?.\u2014\u2013]| - ")   # the first phrase ends at any of these
WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")
DETERMINERS = frozenset("a an the this that these those some any each every my your his her its our their "
                        "one two three four five six seven eight nine ten many several few".split())
PHRASE_END = frozenset("of with in on at for from by to into onto over under near beside behind above below "
                       "and or but that which who whose while as like is are was were be being been has have "
                       "having can could will would".split())
QUANTITY = frozenset("pair couple group bunch slice piece cup glass bowl plate box bottle herd flock pack lot "
                     "kind type sort set pile stack bag basket jar loaf bundle collection row".split())
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
             "geese": "goose", "teeth": "tooth", "feet": "foot", "oxen": "ox", "dice": "die", "lice": "louse",
             "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf", "loaves": "loaf",
             "wolves": "wolf", "calves": "calf", "halves": "half", "shelves": "shelf", "thieves": "thief",
             "cacti": "cactus", "fungi": "fungus", "octopi": "octopus", "sheep": "sheep", "fish": "fish",
             "deer": "deer", "moose": "moose", "series": "series", "species": "species"}
NOT_PLURAL_ENDINGS = ("ss", "us", "is", "ous")


def lemma(word: str) -> str:
    """The singular of an English noun by spelling rules (``cats`` -> cat, ``berries`` -> berry,
    ``boxes`` -> box, ``wolves`` -> wolf); words that are not plurals are returned as they are."""
    word = word.lower().strip("'-")
    if word in IRREGULAR:
        return IRREGULAR[word]
    if len(word) <= 3 or word.endswith(NOT_PLURAL_ENDINGS):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses", "oes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def head_noun(caption: str) -> str | None:
    """The lemma of the noun ``caption``'s first phrase is about (None when it has no word)."""
    phrase = CLAUSE_BREAK.split(caption.lower(), maxsplit=1)[0]
    tokens = words(phrase)
    while tokens:
        cut = next((i for i, t in enumerate(tokens) if i > 0 and (t in PHRASE_END or _is_participle(t))),
                   len(tokens))
        core = [t for t in tokens[:cut] if t not in DETERMINERS] or tokens[:cut]
        head = core[-1] if core else None
        if head in QUANTITY and cut < len(tokens) and tokens[cut] == "of" and cut + 1 < len(tokens):
            tokens = tokens[cut + 1 :]   # "a bunch of grapes": the grapes
            continue
        return lemma(head) if head else None
    return None


def caption_nouns(caption: str, limit: int = 10) -> list[str]:
    """The lemmas of the heads of ``caption``'s noun phrases, in order, each once, at most ``limit``:
    every clause is cut at prepositions, conjunctions and verbs, and each piece's last word is its head
    ("Two cats sleeping on a couch." -> cat, couch; "A bunch of grapes." -> grape). Words shorter than
    three letters and numbers are left out."""
    found: list[str] = []
    for clause in CLAUSE_BREAK.split(caption.lower()):
        phrase: list[str] = []
        for token in [*words(clause), ""]:
            if token and token not in PHRASE_END and not _is_participle(token):
                phrase.append(token)
                continue
            core = [t for t in phrase if t not in DETERMINERS]
            head = lemma(core[-1]) if core else ""
            if len(head) >= 3 and not head.isdigit() and head not in QUANTITY and head not in found:
                found.append(head)
            phrase = []
    return found[:limit]


def _is_participle(token: str) -> bool:
    """``sleeping``, ``riding``: a verb after the noun phrase (not ``thing``, ``king``, ``ring``: too short)."""
    return token.endswith("ing") and len(token) > 5 and token not in ("building", "ceiling", "painting", "clothing",
                                                                      "wedding", "pudding", "dumpling", "earring")


def names_object(caption: str, reference: str) -> bool:
    """Whether ``caption`` has a word whose lemma is the head noun of ``reference``."""
    head = head_noun(reference)
    return head is not None and head in {lemma(w) for w in words(caption)}


def names_object_rate(captions: dict[str, str], references: dict[str, list[str]]) -> float:
    """The share of images whose caption names the head noun of their first reference."""
    if not captions:
        return 0.0
    return sum(names_object(captions[i], references[i][0]) for i in captions) / len(captions)
