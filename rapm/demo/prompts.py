"""Prompts for the digits teacher: several phrasings of each digit, and the digit a prompt asks for.

A phrasing names the digit either as a numeral ("digit 7") or as a word
("the number seven"). The teacher trains on every phrasing of every digit;
evaluation draws (prompt, digit) pairs from the same phrasings in a fixed,
balanced order, and is held out in its images (the held-out split), not in
its wording.
"""

from __future__ import annotations

import re

import numpy as np

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {d}: the numeral, {w}: the word.
PHRASINGS = (
    "a handwritten digit {d}",
    "the number {w}",
    "digit {d}",
    "a drawing of a {d}",
    "{w}",
    "a handwritten {w}",
    "the digit {w}",
    "number {d}",
)

_NUMERAL = re.compile(r"(?<![0-9])([0-9])(?![0-9])")
_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b")


def phrase(digit: int, phrasing: str) -> str:
    """``phrasing`` filled in for ``digit``."""
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return phrasing.format(d=digit, w=NUMBER_WORDS[digit])


def prompts_for(digit: int) -> list[str]:
    """Every phrasing of one digit."""
    return [phrase(digit, p) for p in PHRASINGS]


def training_prompts() -> list[str]:
    """Every phrasing of every digit, digit-major: the prompts the teacher trains on."""
    return [p for d in range(10) for p in prompts_for(d)]


def evaluation_prompts(n: int = 500, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (prompt, digit) pairs, digits balanced (0..9 repeating), phrasings in a seeded order."""
    rng = np.random.RandomState(seed)
    pairs = []
    for i in range(n):
        digit = i % 10
        pairs.append((phrase(digit, PHRASINGS[int(rng.randint(len(PHRASINGS)))]), digit))
    return pairs


def vocabulary() -> list[str]:
    """Every word the prompts use, for the teacher's tokenizer."""
    words = {w for p in training_prompts() for w in p.split()}
    return sorted(words)


def digit_of(prompt: str) -> int:
    """The digit a prompt asks for, from its numeral or its number word."""
    text = prompt.lower()
    found = {int(m) for m in _NUMERAL.findall(text)} | {NUMBER_WORDS.index(m) for m in _WORD.findall(text)}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise ValueError(f"prompt {prompt!r} names {what}; a digits prompt names exactly one, e.g. 'digit 7' or 'the number seven'")
    return found.pop()
