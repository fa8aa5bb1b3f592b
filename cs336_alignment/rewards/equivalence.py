"""Answer equivalence of the default grader: the CS336 reference verdicts.

``reference_equivalent(answer, truth, sympy_equal)`` decides whether a model answer
matches one ground-truth answer, in the order the reference grader does:

1. a ground truth containing ``\\boxed`` is replaced by the content of its last box;
2. the Hendrycks-normalised strings are equal -> correct;
3. otherwise both answers are brought to their canonical plain-text form; equal forms are
   correct, an empty answer is wrong;
4. both forms are split into elements when they look like a tuple or interval; the
   element counts and (for several elements) the enclosing brackets must agree;
5. element by element: two plain fractions must be identical strings (``2/4`` is not
   ``1/2``), an integer never equals a non-integer, and everything else is compared by
   sympy (``simplify(gt - answer) == 0``) when the expression is judged safe to evaluate.

The sympy comparison is passed in as ``sympy_equal`` so that the same procedure runs in
the training process (where only cheap, provably bounded comparisons are allowed and
anything else raises :class:`NeedsSympy`) and in a sandboxed worker process (real sympy).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal

from .extract import last_boxed_content
from .normalize import (
    canonical_form,
    hendrycks_normalize,
    is_simple_fraction,
    looks_like_integer,
    split_tuple,
    sympy_eval_allowed,
)

__all__ = [
    "NeedsSympy",
    "cheap_sympy_equal",
    "reference_equivalent",
    "sympy_difference_is_zero",
    "sympy_equal",
]


SympyEqual = Callable[[str, str], bool]


class NeedsSympy(Exception):
    """Raised by an in-process comparison that would have to call sympy."""


_CANONICAL_INT = re.compile(r"-?(?:0|[1-9][0-9]*)")
_SHORT_DECIMAL = re.compile(r"-?[0-9]*\.[0-9]*")


def _cheap_difference_is_zero(truth: str, given: str) -> bool | None:
    """Exact sympy verdict for two plain numbers, or None when it is not that simple.

    Two integer literals differ by an integer; two decimal literals with at most 15
    digits are sympy Floats of 53-bit precision, which are equal exactly when the
    decimal values are equal. (Tests check this against sympy.)
    """
    if _CANONICAL_INT.fullmatch(truth) and _CANONICAL_INT.fullmatch(given):
        return int(truth) == int(given)
    for text in (truth, given):
        if not _SHORT_DECIMAL.fullmatch(text) or sum(ch.isdigit() for ch in text) == 0:
            return None
        if sum(ch.isdigit() for ch in text) > 15:
            return None
    return Decimal(truth) == Decimal(given)


def cheap_sympy_equal(truth: str, given: str) -> bool:
    """In-process stand-in for the sympy comparison: decides only the cheap cases."""
    if not sympy_eval_allowed(f"({truth})-({given})"):
        return False
    verdict = _cheap_difference_is_zero(truth, given)
    if verdict is None:
        raise NeedsSympy(f"({truth})-({given})")
    return verdict


def sympy_difference_is_zero(truth: str, given: str) -> bool:
    """``simplify(truth - given) == 0`` with sympy's parser (implicit multiplication on).

    Evaluates model-written text, so it must only run inside a sandboxed worker process
    with a hard time limit. Any failure counts as "not equal".
    """
    try:
        import sympy
        from sympy.parsing import sympy_parser

        transformations = sympy_parser.standard_transformations + (
            sympy_parser.implicit_multiplication_application,
        )
        expression = f"({truth})-({given})".replace("^", "**")
        difference = sympy_parser.parse_expr(expression, transformations=transformations)
        return bool(sympy.simplify(difference) == 0)
    except Exception:  # noqa: BLE001 - any failure to parse or simplify means "not shown equal"
        return False


def sympy_equal(truth: str, given: str) -> bool:
    """The reference's element comparison: refused forms are unequal, else sympy decides."""
    if not sympy_eval_allowed(f"({truth})-({given})"):
        return False
    verdict = _cheap_difference_is_zero(truth, given)
    if verdict is not None:
        return verdict
    return sympy_difference_is_zero(truth, given)


def _sympy_stage(answer: str, truth: str | None, compare: SympyEqual) -> bool:
    truth_form = canonical_form(truth)
    if truth_form is None:
        return False
    answer_form = canonical_form(answer)
    assert answer_form is not None
    if truth_form == answer_form:
        return True
    if not answer_form:
        return False
    truth_elems = split_tuple(truth_form)
    answer_elems = split_tuple(answer_form)
    if len(truth_elems) > 1 and (truth_form[0] != answer_form[0] or truth_form[-1] != answer_form[-1]):
        return False
    if len(truth_elems) != len(answer_elems):
        return False
    for truth_elem, answer_elem in zip(truth_elems, answer_elems):
        if is_simple_fraction(truth_elem) and is_simple_fraction(answer_elem):
            same = truth_elem == answer_elem  # unreduced fractions must match exactly
        elif looks_like_integer(truth_elem) != looks_like_integer(answer_elem):
            same = False  # an integer answer needs an integer
        else:
            same = compare(truth_elem, answer_elem)
        if not same:
            return False
    return True


def reference_equivalent(answer: str, truth: str, compare: SympyEqual = sympy_equal) -> bool:
    """Whether ``answer`` matches the ground truth ``truth`` under the reference rules.

    ``compare`` is the element comparison used in the last step: :func:`sympy_equal` in a
    worker process, :func:`cheap_sympy_equal` in the training process (which raises
    :class:`NeedsSympy` when it cannot decide).
    """
    resolved: str | None = truth
    if "\\boxed" in truth:
        resolved = last_boxed_content(truth)
    if hendrycks_normalize(answer) == hendrycks_normalize(resolved):
        return True
    return _sympy_stage(answer, resolved, compare)
