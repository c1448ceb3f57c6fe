"""Answer extraction and comparison for the instruction-tuning benchmarks (generated text → right or wrong).

Each scorer turns a text (a model's generation or a dataset's reference) into a comparable answer, or ``None``
when the text holds none, and says whether two answers agree:

- GSM8K: the number after the last ``####`` (else the last number in the text), compared as exact fractions,
  so ``$1,234.00`` equals ``1234``.
- MATH: the last ``\\boxed{...}`` (nested braces kept), else what follows MetaMath's ``The answer is:``;
  LaTeX spacing and sizing removed; equal as strings or, when both parse as numbers or fractions, as numbers.
- ViGGO meaning representations, SQL and free text: exact match after tokenising, so spacing never matters;
  SQL also ignores case (literals' too, as WikiSQL's evaluation does), the quote style of literals and a trailing
  ``;``. ViGGO and SQL answers are one line: a generation is cut at its first line break.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Optional

# A number: a minus right after a digit is subtraction, commas only as thousands separators.
_NUMBER = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def parse_number(text: str) -> Optional[Fraction]:
    """``-1,234.50``, ``$5``, ``7.``, ``3/4`` → an exact fraction; ``None`` when ``text`` is not one number."""
    text = text.strip().replace("$", "").rstrip(".")
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text.replace(",", ""))
    except ZeroDivisionError:
        return None


def gsm8k_answer(text: str) -> Optional[Fraction]:
    """The first number after the last ``####`` if there is one, else the last number in ``text``."""
    _, marker, tail = text.rpartition("####")
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    return parse_number(numbers[0] if marker else numbers[-1])


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included; ``\\boxed 5`` too."""
    starts = list(re.finditer(r"\\(?:boxed|fbox)", text))
    if not starts:
        return None
    rest = text[starts[-1].end() :]
    if rest.startswith(" "):  # \boxed 5
        words = rest.split(None, 1)
        return words[0].rstrip("$") if words else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i]
    return None  # unbalanced: cut off mid-answer


_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\^\{?\\circ\}?|\\%|\\\$|\$|\s")


def normalize_math(answer: str) -> str:
    """Drop spacing, ``\\left``/``\\right``, degree signs, ``$``; ``dfrac``/``tfrac`` → ``frac``; no final ``.``."""
    answer = _LATEX_NOISE.sub("", answer)
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return answer.rstrip(".")


_FRACTION = re.compile(r"(-?)\\frac(?:\{([^{}]+)\}\{([^{}]+)\}|(\d)(\d))")


def math_number(answer: str) -> Optional[Fraction]:
    """A normalised answer as a number when it is one: ``0.5``, ``-3``, ``1/2``, ``\\frac{1}{2}``, ``\\frac12``."""
    match = _FRACTION.fullmatch(answer)
    if match is None:
        return parse_number(answer)
    numerator, denominator = parse_number(match[2] or match[4]), parse_number(match[3] or match[5])
    if numerator is None or not denominator:
        return None
    return -numerator / denominator if match[1] else numerator / denominator


def math_answer(text: str) -> Optional[str]:
    """The final answer of a MATH solution or generation, normalised."""
    answer = last_boxed(text)
    if answer is None:
        _, marker, tail = text.rpartition("The answer is:")
        answer = tail.strip().split("\n")[0] if marker else None
    return normalize_math(answer) if answer else None


def math_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    x, y = math_number(a), math_number(b)
    return x is not None and x == y


_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\w+|[^\w\s]")


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def normalize_text(text: str) -> str:
    """Tokens joined by single spaces: ``a  (b ,c)`` and ``a(b, c)`` normalise alike."""
    return " ".join(_tokens(text.strip()))


def _first_line(text: str) -> str:
    return next((line for line in text.strip().splitlines() if line.strip()), "")


def normalize_mr(text: str) -> str:
    """A ViGGO meaning representation, e.g. ``inform(name[Tomb Raider], rating[good])``."""
    return normalize_text(_first_line(text))


def _single_quoted(token: str) -> str:
    """A quoted literal written with single quotes: ``"it's"`` → ``'it''s'``."""
    if token[0] != '"':
        return token
    return "'" + token[1:-1].replace('""', '"').replace("'", "''") + "'"


def normalize_sql(text: str) -> str:
    """An SQL query, compared as WikiSQL's own evaluation does: tokens (so spacing never matters), case folded
    everywhere, literals too (WikiSQL's values carry the table's capitalisation, which the question does not give),
    ``"..."`` and ``'...'`` literals alike, a trailing ``;`` dropped."""
    tokens = _tokens(_first_line(text))
    while tokens and tokens[-1] == ";":
        tokens.pop()
    return " ".join(_single_quoted(t).lower() for t in tokens)


@dataclass(frozen=True)
class Scorer:
    extract: Callable[[str], Any]  # text → its answer; None or "" when it holds none
    equal: Callable[[Any, Any], bool] = operator.eq

    def correct(self, prediction: str, gold: str) -> bool:
        """Is the generated text ``prediction`` right, given the reference text ``gold``? No answer is wrong."""
        answer = self.extract(prediction)
        return answer is not None and answer != "" and self.equal(answer, self.extract(gold))


SCORERS = {
    "gsm8k": Scorer(gsm8k_answer),
    "math": Scorer(math_answer, math_equal),
    "mr": Scorer(normalize_mr),
    "sql": Scorer(normalize_sql),
    "text": Scorer(normalize_text),
}


_SLOT = re.compile(r"(\w+)\[([^\[\]]*)\]")


def mr_slots(text: str) -> tuple[str, frozenset[tuple[str, str]]]:
    """A ViGGO meaning representation's dialogue act and its set of ``(attribute, value)`` slots, values
    normalised as answers are (spacing, case kept): ``inform(name[Tomb Raider], rating[good])`` →
    ``("inform", {("name", "Tomb Raider"), ("rating", "good")})``."""
    line = _first_line(text)
    act = line.split("(", 1)[0].strip()
    return act, frozenset((name, normalize_text(value)) for name, value in _SLOT.findall(line))


def slot_f1(predictions: list[str], golds: list[str]) -> float:
    """Micro-averaged F1 of the predicted ``(attribute, value)`` slots against the references', over all rows
    (the dialogue act counts as one more slot): partial credit where exact match gives none."""
    hits = predicted = expected = 0
    for prediction, gold in zip(predictions, golds):
        (act_p, slots_p), (act_g, slots_g) = mr_slots(prediction), mr_slots(gold)
        slots_p, slots_g = slots_p | {("act", act_p)} if act_p else slots_p, slots_g | {("act", act_g)}
        hits += len(slots_p & slots_g)
        predicted += len(slots_p)
        expected += len(slots_g)
    return 2 * hits / (predicted + expected) if predicted + expected else 0.0
