"""The head-noun matcher behind "names the object", on hand-made cases."""

import pytest

from clipcap.naming import caption_nouns, head_noun, lemma, names_object, names_object_rate


@pytest.mark.parametrize("word, expected", [
    ("cats", "cat"), ("berries", "berry"), ("boxes", "box"), ("wolves", "wolf"), ("children", "child"),
    ("people", "person"), ("glass", "glass"), ("bus", "bus"), ("cactus", "cactus"), ("potatoes", "potato"),
    ("toys", "toy"), ("pig", "pig"), ("Mice", "mouse"), ("sheep", "sheep"),
    ("gas", "gas"), ("ties", "tie"), ("pies", "pie"), ("'root'", "root"), ("cats'", "cat"),
])
def test_lemmas(word, expected):
    assert lemma(word) == expected


@pytest.mark.parametrize("reference, head", [
    ("A Tamworth pig.", "pig"),
    ("A Tamworth pig in the mud.", "pig"),
    ("Two cats sleeping on a couch.", "cat"),
    ("A man riding a horse.", "man"),
    ("The baby of a gnu.", "baby"),
    ("A bunch of grapes.", "grape"),
    ("A cup of coffee on a table.", "coffee"),
    ("An inukshuk (or inuksuk), a landmark made of stones.", "inukshuk"),
    ("Jupiter\u2014the largest planet in our solar system!", "jupiter"),
    ("Wolves howling at the moon.", "wolf"),
    ("A red fire truck.", "truck"),
    ("Happy!", "happy"),
    ("The letter c.", "c"),
    ("An old building with a clock.", "building"),
    ("A ginger 'root'.", "root"),
    ("Under the sea.", "sea"),                 # a phrase may begin with a preposition
    ("A cup and a saucer.", "cup"),            # a quantity word hands on only before "of"
    ("A gold ring.", "ring"),                  # a short word in -ing is no verb
    ("These!", "these"),                       # nothing but a determiner: that word
    ("", None),
])
def test_head_nouns(reference, head):
    assert head_noun(reference) == head


@pytest.mark.parametrize("caption, reference, named", [
    ("A pig.", "A Tamworth pig.", True),
    ("Some pigs in a field.", "A Tamworth pig.", True),
    ("A cat.", "Two cats sleeping on a couch.", True),
    ("A catapult.", "A cat.", False),            # whole words, not substrings
    ("A horse.", "A man riding a horse.", False),  # the man is what the reference is about
    ("A firetruck.", "A red fire truck.", False),
    ("A truck.", "A red fire truck.", True),
    ("Grapes on a vine.", "A bunch of grapes.", True),
    ("A volleyball.", "An igloo.", False),
    ("", "An igloo.", False),
])
def test_names_object(caption, reference, named):
    assert names_object(caption, reference) is named


def test_the_rate_is_the_share_of_images_named_by_their_first_reference():
    # d's caption names its second reference only: not named
    references = {"a": ["A pig.", "A hog."], "b": ["An igloo."], "c": ["Two cats."], "d": ["A boat.", "A hog."]}
    captions = {"a": "A pig.", "b": "A volleyball.", "c": "A cat on a mat.", "d": "A hog."}
    assert names_object_rate(captions, references) == 0.5
    assert names_object_rate({}, references) == 0.0


@pytest.mark.parametrize("caption, nouns", [
    ("A girl riding a horse.", ["girl", "horse"]),
    ("Two cats sleeping on a couch.", ["cat", "couch"]),
    ("A bunch of grapes.", ["grape"]),                      # not the quantity word
    ("Number 12.", []),
    ("A sign with 100 on it.", ["sign"]),                  # no numbers, no words under three letters
    ("A gold ring on a cushion.", ["ring", "cushion"]),
    ("A cat, a dog, a hen and a fox.", ["cat", "dog", "hen", "fox"]),
])
def test_caption_nouns_are_the_heads_of_its_phrases(caption, nouns):
    assert caption_nouns(caption) == nouns
    assert caption_nouns(caption, limit=1) == nouns[:1]


def test_caption_nouns_keeps_the_first_limit_of_them():
    assert caption_nouns("An albino peahen (a female peafowl, or peacock).", limit=2) == ["peahen", "peafowl"]
