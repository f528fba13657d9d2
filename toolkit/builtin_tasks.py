"""The offline default dataset: instruction tasks whose answers can be checked exactly.

Six families, each a short instruction (in a few phrasings) with its items in the input field,
so held-out accuracy measures whether the model learned the rule rather than memorised the pairs.
Every kind of input is asked under several families (a word list: reverse, count or upper-case it; a
list of digits: sort it or give the largest; a table: the value of the key the instruction names), so
only the instruction tells which answer is wanted. Items are spaced so each word, digit and value is one
GPT-2 token that the answer can copy.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

GENERATOR_VERSION = "builtin-tasks-v3"

# Each word, and its upper-case form, is one GPT-2 token (" cat" -> " CAT"), so upper-casing is a word-for-word
# mapping the model can learn rather than a re-spelling into other sub-word pieces.
WORDS = (
    "cat sun red house car book fire night day star sea king gold game ball ear box map bus key ice man art "
    "air arm bar cap card city code face fun head hero home law leg life line love name news note page park "
    "plan rock school sign space step table team time top view week world year"
).split()

Example = tuple[str, str, str]  # instruction, input, response


def _words(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 5))


def _say(rng: random.Random, *phrasings: str) -> str:
    return rng.choice(phrasings)


def reverse_words(rng: random.Random) -> Example:
    words = _words(rng)
    ask = _say(rng, "Reverse the order of the words.", "Write the words in reverse order.", "Reverse this list.")
    return ask, " ".join(words), " ".join(reversed(words))


def _digits(rng: random.Random, fewest: int) -> list[int]:
    return rng.sample(range(10), rng.randint(fewest, 6))


def sort_numbers(rng: random.Random) -> Example:
    numbers = _digits(rng, 3)
    ask = _say(rng, "Sort the numbers from smallest to largest.", "Sort these numbers.", "Put the numbers in order.")
    return ask, " ".join(map(str, numbers)), " ".join(
        map(str, sorted(numbers))
    )


def count_words(rng: random.Random) -> Example:
    words = rng.choices(WORDS, k=rng.randint(1, 6))
    ask = _say(rng, "Count the words in the list.", "How many words are there?", "Count the words.")
    return ask, " ".join(words), str(len(words))


def uppercase(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(1, 3))
    ask = _say(rng, "Write the words in capital letters.", "Convert to upper case.", "Make these words uppercase.")
    return ask, " ".join(words), " ".join(words).upper()


def lookup_value(rng: random.Random) -> Example:
    keys = rng.sample("abcdefgh", rng.randint(3, 5))
    values = {key: rng.randint(0, 9) for key in keys}
    wanted = rng.choice(keys)
    table = ", ".join(f"{key} = {value}" for key, value in values.items())
    ask = _say(rng, f"Look up the value of {wanted}.", f"What is {wanted}?", f"Give the value of {wanted}.")
    return ask, table, str(values[wanted])


def largest_number(rng: random.Random) -> Example:
    numbers = _digits(rng, 2)
    ask = _say(rng, "Give the largest number.", "Which number is the largest?", "Find the maximum.")
    return ask, " ".join(map(str, numbers)), str(max(numbers))


FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "reverse_words": reverse_words,
    "sort_numbers": sort_numbers,
    "count_words": count_words,
    "uppercase": uppercase,
    "lookup_value": lookup_value,
    "largest_number": largest_number,
}


def generate(n: int, seed: int = 0) -> Iterator[dict[str, str]]:
    """Yield `n` distinct examples, families in turn, as canonical rows without ids."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    families = list(FAMILIES.items())
    produced, attempts = 0, 0
    while produced < n:
        name, make = families[attempts % len(families)]
        attempts += 1
        instruction, input_text, response = make(rng)
        if (instruction, input_text) in seen:
            continue
        seen.add((instruction, input_text))
        produced += 1
        yield {"instruction": instruction, "input": input_text, "response": response, "category": name}
        if attempts > 50 * n:
            raise RuntimeError(f"could not generate {n} distinct built-in examples")
