"""Write src/clipcap/modeling/imagenet_nouns.json: for each of the 1,000 ImageNet classes, in class order,
the everyday noun a caption would use for it (tabby -> cat, espresso -> coffee, sorrel -> horse, junco -> bird,
Granny Smith -> apple, brown bear -> bear), read from WordNet 3.0's hypernyms and sense counts.

    apt-get install --no-install-recommends wordnet-base   # WordNet 3.0's database files
    python scripts/imagenet_nouns.py

The table is committed: the entity source ``classifier`` reads it, and nothing at training or inference
time needs WordNet. The rule, in order, for a class's synset:
1. the one-word name of the class itself that the corpus uses most in this sense, if it uses one at all
   (hog, pig -> pig; cock, rooster -> rooster; banana);
2. else the nearest of its first ``DEPTH`` hypernyms (stopping at abstract categories, ``TOO_GENERAL``: animal,
   device, food) with a one-word name that WordNet's sense-tagged corpus uses in that sense at least
   ``BASIC_COUNT`` times, unless it only names a kind (``KINDS``: vegetable, insect, bird): tabby -> cat,
   beagle -> dog, espresso -> coffee, sorrel -> horse;
3. else the last word of its own first name (banana, broccoli, ladybug, moped, brown bear -> bear), or of
   the first name on its hypernym path that is not a proper name (Granny Smith -> eating apple -> apple);
   but the whole name where the corpus uses that last word only for other kinds of thing (sea lion, not
   lion; guinea pig, walking stick, ice cream, remote control: ``misleading``).

Beside each class's own noun, a few general nouns (``GENERAL``) gather the classes under them in WordNet, so
the head can name what no single class is sure of: ImageNet has no class for a person, but 3 classes of people
and 49 of things people wear (military uniform, suit, football helmet: a photo of one mostly shows it worn);
a building seen from afar spreads over stupa, palace, monastery, boathouse. The classes of each are listed
under ``general`` (class indices), and the head adds their probabilities.

Each noun's ``kinds`` are the words that name it more broadly or more narrowly (``kind_words``: plane ->
aircraft, jet; person -> girl, doctor): a neighbour's caption that uses one names what the head names, so the
novelty rule does not call the image a new kind of thing (``clipcap.modeling.entities.novel_images``).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
OUT = Path(__file__).resolve().parents[1] / "src" / "clipcap" / "modeling" / "imagenet_nouns.json"
DEPTH = 3
BASIC_COUNT = 4           # a hypernym used this often is the everyday name (tabby -> cat, beagle -> dog)
KINDS = frozenset("vegetable insect fruit dish beverage bird fish flower tree".split())  # never over a class's own name
TOO_GENERAL = frozenset(
    "entity physical_entity object whole artifact organism living_thing being animal device instrumentality "
    "container structure covering commodity matter substance food nutriment solid thing unit abstraction part "
    "material equipment implement conveyance vehicle wheeled_vehicle self-propelled_vehicle craft vessel "
    "invertebrate vertebrate chordate placental mammal carnivore arthropod vascular_plant produce edible_fruit "
    "instrument protection clothing garment game tool machine piece system creation decoration article".split())

GENERAL = {"person": ("person", "clothing"), "building": ("building",), "flower": ("flower",)}  # noun -> the
# synsets (first noun sense of each lemma) whose hyponyms it gathers


def read_synsets() -> dict[str, tuple[list[str], list[str]]]:
    """offset -> (lemmas, hypernym offsets) of every noun synset."""
    synsets = {}
    for line in (WORDNET / "data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        fields = line.split(" | ")[0].split()
        words = int(fields[3], 16)
        lemmas = [fields[4 + 2 * i] for i in range(words)]
        at = 4 + 2 * words
        pointers, at = int(fields[at]), at + 1
        hypernyms = []
        for _ in range(pointers):
            symbol, offset, pos = fields[at : at + 3]
            at += 4
            if symbol in ("@", "@i") and pos == "n":
                hypernyms.append(offset)
        synsets[fields[0]] = (lemmas, hypernyms)
    return synsets


def read_counts() -> dict[tuple[str, str], int]:
    """(lemma, synset offset) -> how often the sense-tagged corpus uses the lemma in that sense."""
    sense_number = {}
    for line in (WORDNET / "index.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        fields = line.split()
        offsets = fields[-int(fields[2]):]
        for number, offset in enumerate(offsets, 1):
            sense_number[(fields[0], number)] = offset
    counts = {}
    for line in (WORDNET / "cntlist.rev").read_text().splitlines():
        key, number, count = line.split()
        lemma, sense = key.split("%")
        if sense.startswith("1:") and (lemma, int(number)) in sense_number:
            counts[(lemma, sense_number[(lemma, int(number))])] = int(count)
    return counts


def everyday_noun(offset: str, synsets, counts) -> str:
    path = [offset]
    while synsets[path[-1]][1]:
        path.append(synsets[path[-1]][1][0])

    def best(at: str, minimum: int) -> str | None:
        single = [lemma for lemma in synsets[at][0]
                  if "_" not in lemma and "-" not in lemma and lemma.lower() not in TOO_GENERAL]
        used = [lemma for lemma in single if counts.get((lemma.lower(), at), 0) >= minimum]
        return max(used, key=lambda lemma: counts[(lemma.lower(), at)]).lower() if used else None

    ancestors = []
    for hypernym in path[1 : DEPTH + 1]:
        if any(lemma.lower() in TOO_GENERAL for lemma in synsets[hypernym][0]):
            break
        ancestors.append(hypernym)
    everyday = (best(at, BASIC_COUNT) for at in ancestors)
    found = best(path[0], 1) or next((noun for noun in everyday if noun and noun not in KINDS), None)
    if found:
        return found
    common = next(lemma for at in path for lemma in synsets[at][0][:1] if not lemma[:1].isupper())
    last = common.replace("-", "_").split("_")[-1].lower()
    if common.lower() != last and misleading(last, path, synsets, counts):
        return common.replace("_", " ").lower()   # sea lion, not lion; walking stick, not stick
    return last


@functools.cache
def noun_senses() -> dict[str, list[str]]:
    """lemma -> the synset offsets of its noun senses, most frequent first."""
    senses = {}
    for line in (WORDNET / "index.noun").read_text(encoding="latin-1").splitlines():
        fields = line.split()
        if fields and not line.startswith("  "):
            senses[fields[0]] = fields[-int(fields[2]):]
    return senses


def misleading(word: str, path: list[str], synsets, counts) -> bool:
    """Whether the corpus uses ``word`` only for other kinds of thing than the class at the start of ``path``
    (its first hypernyms up to the root): none of the senses it uses ``word`` in (all of them if it uses none)
    lies under the class's own kinds (the class and its hypernyms before the first ``TOO_GENERAL`` one):
    "lion" for a sea lion (an eared seal), "widow" for a black widow; not "car" for a sports car."""
    end = next((i for i in range(1, len(path)) if synsets[path[i]][0][0].lower() in TOO_GENERAL), len(path))
    kinds = set(path[:end])   # by first names: car, also called "machine", is a kind
    senses = noun_senses().get(word, [])
    used = [sense for sense in senses if counts.get((word, sense), 0) >= 1] or senses
    return bool(used) and not any(ancestors(sense, synsets) & kinds for sense in used)


def first_sense(lemma: str) -> str:
    """The synset offset of ``lemma``'s first noun sense."""
    return noun_senses()[lemma][0]


def ancestors(offset: str, synsets, below_general: bool = False) -> set[str]:
    """Every synset above ``offset`` in WordNet (all hypernym paths), itself included; ``below_general``: only
    those before the first ``TOO_GENERAL`` one on each path (the class's own kinds)."""
    seen, todo = set(), [offset]
    while todo:
        at = todo.pop()
        if at not in seen and not (below_general and any(lemma.lower() in TOO_GENERAL for lemma in synsets[at][0])):
            seen.add(at)
            todo.extend(synsets[at][1])
    return seen


def general_classes(wnids: list[str], synsets) -> dict[str, list[int]]:
    """``GENERAL``'s nouns -> the indices of the classes under any of their synsets."""
    above = [ancestors(wnid[1:], synsets) for wnid in wnids]
    roots = {noun: {first_sense(lemma) for lemma in lemmas} for noun, lemmas in GENERAL.items()}
    return {noun: [index for index, found in enumerate(above) if found & offsets] for noun, offsets in roots.items()}


def phrase(lemma: str) -> str:
    return lemma.replace("_", " ").lower()


def kind_words(nouns: list[str], wnids: list[str], synsets, counts) -> dict[str, list[str]]:
    """Each noun -> the words that name it more broadly or more narrowly: the names of its classes' own kinds
    (``ancestors`` below the too general ones: plane -> aircraft, dog -> canid) whose first sense is that
    kind, and the words whose first sense, used by the sense-tagged corpus, lies under the noun's own sense
    (person -> girl, doctor; dog -> puppy). Its own sense: the synset on its classes' paths that bears the noun (airplane for an airliner's
    "plane"), for a general noun its first sense. A neighbour's caption using one of them names the noun."""
    senses = noun_senses()
    first = {lemma: offsets[0] for lemma, offsets in senses.items()}
    used = {lemma: at for lemma, at in first.items() if counts.get((lemma, at), 0) >= 1}
    above = {lemma: ancestors(at, synsets) for lemma, at in used.items()}
    classes = {}
    for wnid, noun in zip(wnids, nouns):
        classes.setdefault(noun, []).append(wnid[1:])
    found = {}
    for noun in [*dict.fromkeys(nouns), *GENERAL]:
        if noun in GENERAL:
            kinds, own = set(), {first_sense(noun)}
        else:
            kinds = set().union(*(ancestors(at, synsets, below_general=True) for at in classes[noun]))
            own = {at for at in kinds if noun in map(phrase, synsets[at][0])} or set(classes[noun])
        broader = {phrase(lemma) for at in kinds for lemma in synsets[at][0] if first.get(lemma.lower()) == at}
        narrower = {phrase(lemma) for lemma, seen in above.items() if seen & own}
        found[noun] = sorted((broader | narrower) - {noun})
    return found


def main() -> None:
    import timm

    if not (WORDNET / "data.noun").exists():
        sys.exit(f"{WORDNET}: no WordNet database; apt-get install --no-install-recommends wordnet-base")
    wnids = (Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    synsets, counts = read_synsets(), read_counts()
    nouns = [everyday_noun(wnid[1:], synsets, counts) for wnid in wnids]
    general = general_classes(wnids, synsets)
    kinds = kind_words(nouns, wnids, synsets, counts)
    OUT.write_text(json.dumps({"source": "WordNet 3.0 via scripts/imagenet_nouns.py", "nouns": nouns,
                               "general": general, "kinds": kinds}, indent=0) + "\n")
    print(f"wrote {OUT}: {len(nouns)} classes, {len(set(nouns))} nouns; general: "
          + ", ".join(f"{noun} {len(found)} classes" for noun, found in general.items()))


if __name__ == "__main__":
    main()
