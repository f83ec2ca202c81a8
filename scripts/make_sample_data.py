"""Regenerate the data the project ships in worker/data/.

    python scripts/make_sample_data.py           # rewrite the files
    python scripts/make_sample_data.py --check   # exit 1 if a shipped file differs from what this writes

Writes, byte-identically on every run (no wall clock, no hash ordering, only seeded ``random.Random``):

- ``alpaca_sample.jsonl``: about 400 Alpaca-shaped records ``{"instruction", "input", "output"}`` from
  templated task families over a small fixed vocabulary, so a 2-layer, 128-wide GPT-2 can learn them in a
  few hundred CPU steps. Outputs range from one word to numbered lists of 30 lines.
- ``alpaca_sample_val.jsonl``: about 60 held-out records from the same families (another seed, no record
  that is also in the training file).
- ``corpus.txt``: the text the offline tokenizer is trained on: both Alpaca prompt templates verbatim,
  the training records rendered through them, and generated plain English prose.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.prompts import PROMPT_NO_INPUT, PROMPT_WITH_INPUT  # noqa: E402  (the Stanford Alpaca templates)

DATA_DIR = ROOT / "worker" / "data"

TRAIN_SEED = 1234
VAL_SEED = 98765
N_TRAIN = 400
N_VAL = 60
PROSE_SEED = 4242
N_PROSE_PARAGRAPHS = 260

Record = dict[str, str]

# ----------------------------------------------------------------------------------------------------------
# Fixed vocabulary
# ----------------------------------------------------------------------------------------------------------

COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "pink", "gray"]
ANIMALS = [
    "cat", "dog", "horse", "cow", "sheep", "goat", "fox", "wolf", "bear", "lion",
    "tiger", "mouse", "rabbit", "duck", "owl", "frog", "fish", "whale", "snake", "eagle",
]  # fmt: skip
FRUITS = ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum"]
THINGS = [
    "house", "table", "chair", "river", "mountain", "garden", "window", "door", "book", "lamp",
    "road", "tree", "cloud", "stone", "bridge", "boat", "train", "city", "forest", "field",
]  # fmt: skip
WORDS = sorted({*COLORS, *ANIMALS, *FRUITS, *THINGS})

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("old", "young"), ("open", "closed"), ("early", "late"), ("high", "low"),
    ("full", "empty"), ("wet", "dry"),
]  # fmt: skip
OPPOSITE_OF = {a: b for a, b in OPPOSITES} | {b: a for a, b in OPPOSITES}

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Greece", "Athens"), ("Kenya", "Nairobi"),
    ("Poland", "Warsaw"), ("Chile", "Santiago"), ("Sweden", "Stockholm"), ("Turkey", "Ankara"),
]  # fmt: skip

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

POSITIVE = ["wonderful", "great", "excellent", "lovely", "delightful", "amazing", "pleasant", "fantastic"]
NEGATIVE = ["terrible", "awful", "horrible", "boring", "disappointing", "dreadful", "poor", "unpleasant"]
REVIEW_SUBJECTS = ["movie", "meal", "book", "hotel", "concert", "trip", "service", "game", "show", "class"]
REVIEW_EXTRAS = [
    "", "", " and I would tell my friends about it", " from start to finish", " in every way",
    " for the whole family", " even on a rainy day",
]  # fmt: skip

# name -> (kind, habitat, food, color, trait)
ANIMAL_FACTS = {
    "cat": ("small", "house", "fish and meat", "black or gray", "curious"),
    "dog": ("loyal", "house", "meat", "brown or white", "friendly"),
    "horse": ("large", "field", "grass and hay", "brown", "strong"),
    "cow": ("large", "field", "grass", "black and white", "calm"),
    "sheep": ("gentle", "field", "grass", "white", "quiet"),
    "fox": ("wild", "forest", "mice and berries", "orange", "clever"),
    "wolf": ("wild", "forest", "meat", "gray", "brave"),
    "bear": ("large", "forest", "fish and berries", "brown", "strong"),
    "lion": ("wild", "grassland", "meat", "yellow", "proud"),
    "owl": ("small", "forest", "mice", "brown", "wise"),
    "frog": ("small", "pond", "insects", "green", "noisy"),
    "whale": ("huge", "ocean", "small fish", "gray", "gentle"),
    "eagle": ("wild", "mountain", "fish and small animals", "brown", "fast"),
    "rabbit": ("small", "field", "grass and carrots", "white or brown", "quick"),
}

CATEGORIES = {"colors": COLORS, "animals": ANIMALS, "fruits": FRUITS, "days of the week": DAYS}

# ----------------------------------------------------------------------------------------------------------
# Task families: each takes a Random and returns one record
# ----------------------------------------------------------------------------------------------------------


def _rec(instruction: str, input_: str, output: str) -> Record:
    return {"instruction": instruction, "input": input_, "output": output}


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def reverse_words(rng: random.Random) -> Record:
    words = _words(rng, 3, 10)
    return _rec("Reverse the following list of words.", " ".join(words), " ".join(reversed(words)))


def sort_words(rng: random.Random) -> Record:
    words = _words(rng, 3, 10)
    return _rec("Sort the following words alphabetically.", " ".join(words), " ".join(sorted(words)))


def count_words(rng: random.Random) -> Record:
    words = _words(rng, 1, 20)
    answer = "There is 1 word." if len(words) == 1 else f"There are {len(words)} words."
    return _rec("Count the words in the input.", " ".join(words), answer)


def uppercase(rng: random.Random) -> Record:
    subject = rng.choice(ANIMALS + THINGS)
    text = f"the {rng.choice(COLORS)} {subject} is {rng.choice(['near', 'far from', 'behind', 'under'])} the "
    text += f"{rng.choice(THINGS)}"
    if rng.random() < 0.4:
        text += f" and the {rng.choice(ANIMALS)} is {rng.choice(['happy', 'sad', 'quiet', 'loud'])}"
    instruction = rng.choice(["Convert the input to uppercase.", "Rewrite the input in capital letters."])
    return _rec(instruction, text, text.upper())


def sentiment(rng: random.Random) -> Record:
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    subject = rng.choice(REVIEW_SUBJECTS)
    text = rng.choice(
        [
            f"The {subject} was {adjective}{rng.choice(REVIEW_EXTRAS)}.",
            f"I thought the {subject} was {adjective}.",
            f"What a {adjective} {subject}{rng.choice(REVIEW_EXTRAS)}.",
            f"Honestly, the {subject} felt {adjective} to me.",
        ]
    )
    return _rec(
        "Classify the sentiment of the input as positive or negative.",
        text,
        "positive" if positive else "negative",
    )


def numbered_list(rng: random.Random) -> Record:
    words = _words(rng, 5, 30)
    return _rec(
        "Write the words in the input as a numbered list, one per line.",
        " ".join(words),
        "\n".join(f"{i}. {w}" for i, w in enumerate(words, start=1)),
    )


def opposite(rng: random.Random) -> Record:
    word = rng.choice(sorted(OPPOSITE_OF))
    instruction = rng.choice(
        [
            f"What is the opposite of {word}?",
            f"Give the opposite of the word {word}.",
            f"Name an antonym of {word}.",
            f"What word means the opposite of {word}?",
            f"Tell me the opposite of {word}.",
        ]
    )
    return _rec(instruction, "", f"The opposite of {word} is {OPPOSITE_OF[word]}.")


def spell_backwards(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    return _rec(f"Spell the word {word} backwards.", "", word[::-1])


def capital(rng: random.Random) -> Record:
    country, city = rng.choice(CAPITALS)
    instruction = rng.choice(
        [
            f"What is the capital of {country}?",
            f"Give the capital of {country}.",
            f"Name the capital city of {country}.",
            f"Which city is the capital of {country}?",
            f"Tell me the capital of {country}.",
            f"What city is the capital of {country}?",
        ]
    )
    return _rec(instruction, "", f"The capital of {country} is {city}.")


def count_range(rng: random.Random) -> Record:
    start = rng.randint(1, 60)
    stop = start + rng.randint(4, 29)
    numbers = ", ".join(str(i) for i in range(start, stop + 1))
    return _rec(f"List the numbers from {start} to {stop}.", "", numbers)


def repeat_word(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    n = rng.randint(2, 12)
    return _rec(f"Repeat the word {word} {n} times.", "", " ".join([word] * n))


def week_from(rng: random.Random) -> Record:
    i = rng.randrange(7)
    return _rec(f"List the days of the week starting from {DAYS[i]}.", "", ", ".join(DAYS[i:] + DAYS[:i]))


def list_category(rng: random.Random) -> Record:
    category = rng.choice(sorted(CATEGORIES))
    items = CATEGORIES[category]
    n = rng.randint(2, min(len(items), 10))
    return _rec(f"Name {n} {category}.", "", ", ".join(items[:n]) + ".")


def describe_animal(rng: random.Random) -> Record:
    name = rng.choice(sorted(ANIMAL_FACTS))
    kind, habitat, food, color, trait = ANIMAL_FACTS[name]
    instruction = rng.choice([f"Describe the {name}.", f"Write a short description of the {name}."])
    output = (
        f"The {name} is a {kind} animal. It lives in the {habitat} and eats {food}. "
        f"Its color is usually {color}. People often say that the {name} is {trait}."
    )
    return _rec(instruction, "", output)


# Weighted towards the lookup families (fixed tables, short answers) that a 2-layer, 128-wide model learns
# in a few hundred steps; the copy families (reverse, sort, numbered lists, ...) give length and variety and
# need longer training.
FAMILIES: list[tuple[Callable[[random.Random], Record], int]] = [
    (capital, 6),
    (opposite, 6),
    (sentiment, 5),
    (list_category, 3),
    (week_from, 2),
    (describe_animal, 2),
    (count_range, 2),
    (repeat_word, 2),
    (reverse_words, 2),
    (count_words, 2),
    (uppercase, 2),
    (numbered_list, 2),
    (sort_words, 1),
    (spell_backwards, 1),
]


def make_records(seed: int, n: int, exclude: list[Record] | None = None) -> list[Record]:
    """``n`` distinct records from a weighted mix of the families, none equal to a record in ``exclude``."""
    rng = random.Random(seed)
    functions = [f for f, _ in FAMILIES]
    weights = [w for _, w in FAMILIES]
    seen = {json.dumps(r, sort_keys=True) for r in exclude or []}
    out: list[Record] = []
    while len(out) < n:
        record = rng.choices(functions, weights)[0](rng)
        key = json.dumps(record, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append(record)
    return out


# ----------------------------------------------------------------------------------------------------------
# Prose for the tokenizer corpus
# ----------------------------------------------------------------------------------------------------------

PEOPLE = [
    "the farmer", "the teacher", "an old sailor", "the young doctor", "my neighbour", "the baker",
    "a tired traveller", "the children", "her brother", "the writer", "the small girl", "the captain",
]  # fmt: skip
VERBS = [
    "walked to", "looked at", "painted", "talked about", "remembered", "carried a letter to",
    "wrote a story about", "waited near", "dreamed of", "cleaned", "visited", "sang about",
]  # fmt: skip
PLACES = [
    "the market", "the old bridge", "the harbour", "the school", "the green hills", "the library",
    "the quiet village", "the station", "the river bank", "the kitchen", "the garden", "the town square",
]  # fmt: skip
TIMES = [
    "in the morning", "after dinner", "before the rain", "at noon", "late at night", "on Sunday",
    "every spring", "during the long winter", "when the sun was low", "on a cold evening",
]  # fmt: skip
CLAUSES = [
    "because the weather was fine", "although nobody had asked", "while the birds were singing",
    "and then went home", "as the bells began to ring", "so that everyone could see",
    "but the door was closed", "and it was a good day",
]  # fmt: skip
REMARKS = [
    "It is important to read the question carefully before writing an answer.",
    "A good answer is short, clear and correct.",
    "Many people enjoy a walk in the park when the weather is warm.",
    "The library opens at nine and closes at six.",
    "Water boils at one hundred degrees and freezes at zero.",
    "There are seven days in a week and twelve months in a year.",
    "The sun rises in the east and sets in the west.",
    "Please write your name at the top of the page.",
    "The first step of any task is to understand what is being asked.",
    "Numbers such as 1, 2, 3, 10, 25 and 100 appear in many lists.",
]

# A wider everyday vocabulary, so the tokenizer learns merges for more of ordinary English than the task
# families use (the corpus then supports a few thousand BPE tokens).
_NOUNS = """
    account answer apple army author baby bag ball band bank basket bath beach bed bell bicycle bird blanket
    board body bottle box boy bread breakfast brick brother bucket building bus butter button cake camera
    candle car card carpet castle chain cheese chicken church circle clock coat coffee college computer
    corner country cup curtain daughter desk diamond dinner doctor dream dress drink engine evening eye
    face factory family father feather fence finger fire flag floor flower friend fruit game gate gift
    glass glove gold grass hammer hand hat heart hill hospital hour idea island jacket journey judge key
    king kitchen knife lake language leaf letter library line lunch machine map market meeting message
    milk minute mirror money month moon morning mother music name nation needle nest newspaper night
    noise nose number ocean office oil orchard page painter paper parent party pencil person picture
    pillow planet plate pocket poem police potato prince problem queen question radio rain reason rice
    ring rock roof room rope salt sand school science sea season shadow ship shirt shoe shop shoulder
    silver sister sky snow soap soldier song sound soup space spoon spring square stair star station
    story street student sugar summer supper sweater teacher temple thunder ticket tomato tongue tool
    tooth towel tower town toy tree truck umbrella uncle valley village voice wall watch water weather
    wheel wind window wine winter woman wood word worker world year
"""
_ADJECTIVES = """
    angry ancient beautiful bitter bright broken busy careful cheap clever comfortable common crowded
    curious dangerous deep different difficult distant dusty eager easy electric empty enormous famous
    fresh friendly frozen gentle giant golden grateful heavy honest hungry important lazy little lonely
    lucky modern narrow nervous noisy ordinary patient polite popular precious proud rare ready remote
    rough round royal rusty sharp shiny silent simple smooth sudden sweet tall thick thin tiny tired
    useful warm wealthy wide wild wise wooden wonderful yellow
"""
_PAST_VERBS = """
    admired answered borrowed built bought carried caught chose cleaned climbed collected cooked covered
    crossed delivered described discovered drew dropped earned emptied explained filled fixed followed
    found gathered guarded held hid imagined invented joined kept lifted locked measured mended missed
    moved noticed opened ordered packed painted passed photographed planted pulled pushed reached
    repaired returned sold sent shared showed sorted studied taught tested threw touched traded visited
    washed watched weighed wrapped
"""
NOUNS = _NOUNS.split()
ADJECTIVES = _ADJECTIVES.split()
PAST_VERBS = _PAST_VERBS.split()
PREPOSITIONS = ["near", "behind", "under", "above", "beside", "inside", "across", "around", "without", "with"]


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def make_prose(seed: int, n_paragraphs: int) -> list[str]:
    rng = random.Random(seed)
    paragraphs = []
    for _ in range(n_paragraphs):
        sentences = []
        for _ in range(rng.randint(3, 7)):
            roll = rng.random()
            if roll < 0.15:
                sentences.append(rng.choice(REMARKS))
                continue
            if roll < 0.55:
                sentence = (
                    f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(PAST_VERBS)} "
                    f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(PREPOSITIONS)} "
                    f"the {rng.choice(NOUNS)}"
                )
                sentences.append(_capitalize(sentence) + ".")
                continue
            sentence = f"{rng.choice(PEOPLE)} {rng.choice(VERBS)} {rng.choice(PLACES)} {rng.choice(TIMES)}"
            if rng.random() < 0.5:
                sentence += f" {rng.choice(CLAUSES)}"
            if rng.random() < 0.3:
                sentence += f", and saw a {rng.choice(COLORS)} {rng.choice(ANIMALS)}"
            sentences.append(_capitalize(sentence) + ".")
        paragraphs.append(" ".join(sentences))
    return paragraphs


# ----------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------


def render(record: Record) -> str:
    """Prompt + response, as training sees it (the EOS token is added by the tokenizer, not as text)."""
    if record["input"]:
        prompt = PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    else:
        prompt = PROMPT_NO_INPUT.format(instruction=record["instruction"])
    return f"{prompt}\n{record['output']}"


def jsonl(records: list[Record]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def make_corpus(train: list[Record]) -> str:
    docs: list[str] = []
    # The raw templates, verbatim, a few times each.
    for _ in range(8):
        docs.append(PROMPT_WITH_INPUT)
        docs.append(PROMPT_NO_INPUT)
    docs.extend(render(r) for r in train)
    prose = make_prose(PROSE_SEED, N_PROSE_PARAGRAPHS)
    # Interleave prose with the rendered examples so neither dominates any part of the file.
    mixed: list[str] = []
    step = max(1, len(docs) // max(1, len(prose)))
    prose_iter = iter(prose)
    for i, doc in enumerate(docs):
        mixed.append(doc)
        if i % step == step - 1:
            mixed.append(next(prose_iter, ""))
    mixed.extend(prose_iter)
    return "\n\n\n".join(d for d in mixed if d) + "\n"


def build_files() -> dict[str, str]:
    train = make_records(TRAIN_SEED, N_TRAIN)
    val = make_records(VAL_SEED, N_VAL, exclude=train)
    return {
        "alpaca_sample.jsonl": jsonl(train),
        "alpaca_sample_val.jsonl": jsonl(val),
        "corpus.txt": make_corpus(train),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the shipped files, write nothing")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name, text in build_files().items():
        path: Path = args.out_dir / name
        data = text.encode("utf-8")
        if args.check:
            if not path.exists() or path.read_bytes() != data:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"wrote {path} ({len(data)} bytes)")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/make_sample_data.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
