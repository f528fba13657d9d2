"""The offline default dataset: instruction tasks whose answers can be checked exactly.

Seven families, each a short instruction (in a few phrasings) with its items in the input field,
so held-out accuracy measures whether the model learned the rule rather than memorised the pairs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

GENERATOR_VERSION = "builtin-tasks-v2"

WORDS = (
    "cat dog sun moon tree river stone bird fish apple green blue red house car road book door "
    "rain snow wind fire water light night day star cloud hill lake sea ship king queen horse "
    "bread milk salt gold iron glass paper music song dance game ball hand foot eye ear"
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


def sort_numbers(rng: random.Random) -> Example:
    numbers = rng.sample(range(10), rng.randint(3, 6))
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


def add_numbers(rng: random.Random) -> Example:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    ask = _say(rng, "Add the two numbers.", "What is the sum of the numbers?", "Add these numbers.")
    return ask, f"{a} {b}", str(a + b)


def lookup_value(rng: random.Random) -> Example:
    keys = rng.sample("abcdefgh", rng.randint(3, 5))
    values = {key: rng.randint(0, 9) for key in keys}
    wanted = rng.choice(keys)
    table = ", ".join(f"{key}={value}" for key, value in values.items())
    ask = _say(rng, f"Look up the value of {wanted}.", f"What is {wanted}?", f"Give the value of {wanted}.")
    return ask, table, str(values[wanted])


def largest_number(rng: random.Random) -> Example:
    numbers = rng.sample(range(100), rng.randint(2, 5))
    ask = _say(rng, "Give the largest number.", "Which number is the largest?", "Find the maximum.")
    return ask, " ".join(map(str, numbers)), str(max(numbers))


FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "reverse_words": reverse_words,
    "sort_numbers": sort_numbers,
    "count_words": count_words,
    "uppercase": uppercase,
    "add_numbers": add_numbers,
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
