"""String normalisation rules of the default grader (pure Python, no sympy).

Two normalisers are applied, as in the CS336 reference grader:

* ``hendrycks_normalize`` — the MATH-dataset ("Hendrycks") rules. Two answers whose
  normalised strings are equal are correct, with no further checks.
* ``canonical_form`` — a second, more aggressive normalisation that produces plain text
  (LaTeX rendered by :mod:`cs336_alignment.rewards.latex_text`) for the sympy stage.

Each rule is listed with an example in ``docs/grading.md``. The rules reproduce the
reference's behaviour exactly, quirks included (for example ``"\\frac{a+b}{c}"``
renders as ``a+b/c``), because the reference's verdicts are what CS336 results are
reported with. Everything here is linear or mildly quadratic in the input length; the
caller bounds the length before running these in the training process.
"""

from __future__ import annotations

import re

from .latex_text import latex_to_text

__all__ = [
    "canonical_form",
    "hendrycks_normalize",
    "is_simple_fraction",
    "looks_like_integer",
    "split_tuple",
    "strip_thousands_commas",
    "sympy_eval_allowed",
]


# =========================================================================================
# Hendrycks (MATH) normalisation
# =========================================================================================

# Unit and filler words removed when they stand alone (between non-word characters or the
# ends of the string). Order matters: removals are applied one word after the other, twice,
# and this order (duplicates included) is the reference's. The words are regex patterns:
# a "." in them matches any character, as in the reference.
_UNIT_WORDS_TEXT = """
east|degree|mph|kmph|ft|m sqaure| m east|sq m|deg|mile|q .|monkey|prime|ratio|profit of rs|rd|o
gm|p . m|lb|tile|per|dm|lt|gain|ab|way|west|a .|b .|c .|d .|e .|f .|g .|h .|t|a|h|no change|men
soldier|pie|bc|excess|st|inches|noon|percent|by|gal|kmh|c|acre|rise|a . m|th|π r 2|sq|mark|l|toy
coin|sq . m|gallon|° f|profit|minw|yr|women|feet|am|pm|hr|cu cm|square|v â € ™|are|rupee|rounds
cubic|cc|mtr|s|ohm|number|kmph|day|hour|minute|min|second|man|woman|sec|cube|mt|sq inch|mp
∏ cm ³|hectare|more|sec|unit|cu . m|cm 2|rs .|rs|kg|g|month|km|m|cm|mm|apple|liter|loss|yard
pure|year|increase|decrease|d|less|Surface|litre|pi sq m|s .|metre|meter|inch
"""
_UNIT_WORDS: list[str] = [w for line in _UNIT_WORDS_TEXT.strip("\n").split("\n") for w in line.split("|")]
_UNIT_WORDS += [w + "s" for w in _UNIT_WORDS]

# (literal prefix that must occur for the pattern to match, compiled pattern); built lazily.
_unit_patterns: list[tuple[str, re.Pattern[str]]] | None = None


def _unit_word_patterns() -> list[tuple[str, re.Pattern[str]]]:
    global _unit_patterns
    if _unit_patterns is None:
        _unit_patterns = [
            (word.split(".")[0], re.compile(r"(^|\W)" + word + r"($|\W)")) for word in _UNIT_WORDS
        ]
    return _unit_patterns


_TEXT_WRAPPED = re.compile(r"^\\text\{(?P<body>.+?)\}$")
_ARRAY_BEGIN = re.compile(r"\\begin\{array\}\{.*?\}")
_TRAILING_TEXT = re.compile(r"\\text\{.*?\}$")


class _KeepInput(Exception):
    """A rule met input it cannot handle; the reference then keeps the input unchanged."""


def _expand_sqrt_shorthand(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (only the first character is wrapped)."""
    if "\\sqrt" not in s:
        return s
    head, *rest = s.split("\\sqrt")
    out = [head]
    for piece in rest:
        if not piece:
            raise _KeepInput("\\sqrt at the end")
        out.append("\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:]))
    return "".join(out)


def _expand_frac_shorthand(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``.

    A ``\\frac`` followed by a single character leaves the whole string unchanged; a
    ``\\frac`` at the very end aborts the Hendrycks normalisation.
    """
    head, *rest = s.split("\\frac")
    out = [head]
    for piece in rest:
        out.append("\\frac")
        if not piece:
            raise _KeepInput("\\frac at the end")
        if piece[0] == "{":
            out.append(piece)
            continue
        if len(piece) < 2:
            return s
        first, second, tail = piece[0], piece[1], piece[2:]
        if second == "{":
            out.append("{" + first + "}" + second + tail)
        else:
            out.append("{" + first + "}{" + second + "}" + tail)
    return "".join(out)


def _slash_to_frac(s: str) -> str:
    """``3/4`` -> ``\\frac{3}{4}`` when both sides are plain integers."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        num, den = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    if s != f"{num}/{den}":
        return s
    return "\\frac{" + str(num) + "}{" + str(den) + "}"


def _hendrycks_rules(s: str) -> str:
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    # matrices: array and bmatrix are spelled pmatrix
    s = _ARRAY_BEGIN.sub(r"\\begin{pmatrix}", s)
    s = s.replace("\\end{array}", "\\end{pmatrix}").replace("bmatrix", "pmatrix")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "")
    # a trailing \text{...} is a unit, unless it is the whole answer
    stripped = _TRAILING_TEXT.sub("", s).strip()
    if stripped and stripped != s:
        s = stripped
    # stand-alone unit words, two passes
    for _ in range(2):
        for prefix, pattern in _unit_word_patterns():
            if prefix in s:
                candidate = pattern.sub(r"\1\2", s)
                if candidate:
                    s = candidate
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    if "\\text{ " in s:
        pieces = s.split("\\text{ ")
        if len(pieces) != 2:
            raise _KeepInput("several '\\text{ ' units")
        s = pieces[0]
    s = s.replace("\\%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = _expand_sqrt_shorthand(s)
    s = s.replace(" ", "")
    s = _expand_frac_shorthand(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def hendrycks_normalize(answer: str | None) -> str | None:
    """Normalise an answer with the MATH-dataset rules (see ``docs/grading.md``)."""
    if answer is None:
        return None
    answer = answer.strip()
    match = _TEXT_WRAPPED.search(answer)
    if match is not None:
        answer = match.group("body").strip()
    try:
        return _hendrycks_rules(answer)
    except (_KeepInput, IndexError):
        return answer


# =========================================================================================
# Canonical plain-text form for the sympy stage
# =========================================================================================

_UNIT_NAMES = ("degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour",
               "day", "week", "month", "year", "foot", "feet", "inch", "yard")
_UNIT_SUFFIXES = [re.compile(name + r"(es)?(s)? *(\^[0-9]+)?") for name in _UNIT_NAMES]
_CARET_CIRC = re.compile(r"\^ *\\circ")
_COMMA_THINSPACE = re.compile(r",\\! *")
_MINUS_SPACES = re.compile(r"- *")
_MIXED_NUMBER = re.compile(r"([0-9]) +([0-9])")
_THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_RENDERED_SYMBOLS = (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*"))


def _parses_as_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _is_whole(x: float) -> bool:
    try:
        return abs(x - int(round(x))) <= 1e-7
    except (OverflowError, ValueError):
        return False


def strip_thousands_commas(s: str) -> str:
    """``1,234,567`` -> ``1234567`` while keeping tuple commas such as ``(1,2)``."""
    while True:
        new = _THOUSANDS_COMMA.sub(r"\1\3\4", s)
        if new == s:
            return new
        s = new


def looks_like_integer(s: str) -> bool:
    """True when ``s`` (thousands commas allowed) is a number within 1e-7 of an integer."""
    try:
        return _is_whole(float(strip_thousands_commas(s)))
    except ValueError:
        return False


def _render_latex(s: str) -> str:
    s = s.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    s = s.replace("\\frac", " \\frac")  # keeps "1\frac{1}{2}" apart as a mixed number
    s = latex_to_text(s)
    for symbol, word in _RENDERED_SYMBOLS:
        s = s.replace(symbol, word)
    return s.strip()


def canonical_form(expr: str | None) -> str | None:
    """Normalise an answer into the plain-text form compared by the sympy stage."""
    if expr is None:
        return None
    match = _TEXT_WRAPPED.search(expr)
    if match is not None:
        expr = match.group("body")
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for pattern in _UNIT_SUFFIXES:
        expr = pattern.sub("", expr)
    expr = _CARET_CIRC.sub("", expr)
    if expr and expr[0] == "{" and expr[-1] == "}":
        expr = expr[1:-1]
    expr = _COMMA_THINSPACE.sub("", expr)
    if _parses_as_float(expr) and _is_whole(float(expr)):
        expr = str(int(round(float(expr))))
    if "\\" in expr:
        try:
            expr = _render_latex(expr)
        except (ValueError, RecursionError):
            pass  # unrenderable LaTeX is compared as written
    expr = _MINUS_SPACES.sub("-", expr)
    expr = _MIXED_NUMBER.sub(r"\1+\2", expr)  # "7 3/4" -> "7+3/4"
    expr = expr.replace(" ", "").replace("{", "").replace("}", "")
    expr = expr.lower()
    if looks_like_integer(expr):
        expr = str(int(float(expr.replace(",", ""))))
    return expr


# =========================================================================================
# Helpers for the element-wise comparison
# =========================================================================================

_BRACKETS = "()[]"
_SIMPLE_FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
_STACKED_POWER = re.compile(r"\^[0-9]+\^")
_LONG_POWER = re.compile(r"\^[0-9][0-9]+")


def split_tuple(expr: str) -> list[str]:
    """Split ``(a, b)`` / ``[a, b)`` into its elements; anything else is one element."""
    expr = strip_thousands_commas(expr)
    if not expr:
        return []
    if (
        len(expr) > 2
        and expr[0] in _BRACKETS
        and expr[-1] in _BRACKETS
        and not any(ch in expr[1:-1] for ch in _BRACKETS)
    ):
        return [elem.strip() for elem in expr[1:-1].split(",")]
    return [expr]


def is_simple_fraction(expr: str) -> bool:
    """``3/4``-like strings, which must match exactly (unreduced fractions are wrong)."""
    return _SIMPLE_FRACTION.search(expr) is not None


def sympy_eval_allowed(expr: str) -> bool:
    """Whether the sympy stage may evaluate ``expr``.

    Refused: more than two distinct letters (after ignoring ``sqrt`` and ``frac``), and
    exponent forms that can blow up (``^{``, ``^(``, stacked or multi-digit exponents).
    """
    letters = {ch for ch in expr.replace("sqrt", "").replace("frac", "") if ch.isalpha()}
    if len(letters) > 2:
        return False
    if "^{" in expr or "^(" in expr:
        return False
    return _STACKED_POWER.search(expr) is None and _LONG_POWER.search(expr) is None
