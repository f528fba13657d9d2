"""The offline default dataset: instruction tasks whose answers can be checked exactly.

Six families share one kind of input, a list of distinct digits, and differ only in their instruction (the
largest, the smallest, the first, the count, sorted up, sorted down), so the model must read the instruction
to answer, and held-out accuracy measures whether it learned each rule rather than memorised the pairs.
The list is written as `[6,0,4,7,3]` and answers as `7` or `0 3 4 6 7`: GPT-2 spells a digit inside the list
as one token without a space ("7") and a digit of the answer as one with it (" 7"), so which digits the input
holds is visible from the tokens alone, not only from where they stand. Measured while choosing it (the default
model, 1,600 steps of a plain training loop, bf16): 98.6% held-out exact match with this spelling, 63% with the
list spaced like the answer.

Why digits and not words: on 2 CPU cores the default run trains for about five minutes, and in that budget a
4-layer, 128-wide GPT-2 from scratch learns rules over a ten-token alphabet but not copying over a vocabulary
of dozens of words (upper-casing, reversing and looking up words stayed at 0-30% in 800 steps, and no better
with five times the rows).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

GENERATOR_VERSION = "builtin-tasks-v4"

Example = tuple[str, str, str]  # instruction, input, response


def _digits(rng: random.Random, fewest: int) -> list[int]:
    return rng.sample(range(10), rng.randint(fewest, 6))


def _listed(numbers: list[int]) -> str:
    return "[" + ",".join(map(str, numbers)) + "]"


def _answer(numbers: list[int]) -> str:
    return " ".join(map(str, numbers))


def _say(rng: random.Random, *phrasings: str) -> str:
    return rng.choice(phrasings)


def largest_number(rng: random.Random) -> Example:
    numbers = _digits(rng, 2)
    ask = _say(rng, "Give the largest number.", "Which number is the largest?", "Find the maximum.")
    return ask, _listed(numbers), str(max(numbers))


def smallest_number(rng: random.Random) -> Example:
    numbers = _digits(rng, 2)
    ask = _say(rng, "Give the smallest number.", "Which number is the smallest?", "Find the minimum.")
    return ask, _listed(numbers), str(min(numbers))


def first_number(rng: random.Random) -> Example:
    numbers = _digits(rng, 2)
    ask = _say(rng, "Give the first number.", "Which number comes first?", "What is the first number?")
    return ask, _listed(numbers), str(numbers[0])


def count_numbers(rng: random.Random) -> Example:
    numbers = _digits(rng, 1)
    ask = _say(rng, "Count the numbers.", "How many numbers are there?", "Count the numbers in the list.")
    return ask, _listed(numbers), str(len(numbers))


def sort_numbers(rng: random.Random) -> Example:
    numbers = _digits(rng, 3)
    ask = _say(rng, "Sort the numbers from smallest to largest.", "Sort these numbers.", "Put the numbers in order.")
    return ask, _listed(numbers), _answer(sorted(numbers))


def sort_descending(rng: random.Random) -> Example:
    numbers = _digits(rng, 3)
    ask = _say(rng, "Sort the numbers from largest to smallest.", "Sort these numbers in descending order.",
               "Put the numbers in order, largest first.")
    return ask, _listed(numbers), _answer(sorted(numbers, reverse=True))


FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "largest_number": largest_number,
    "smallest_number": smallest_number,
    "first_number": first_number,
    "count_numbers": count_numbers,
    "sort_numbers": sort_numbers,
    "sort_descending": sort_descending,
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
