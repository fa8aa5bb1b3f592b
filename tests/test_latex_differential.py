"""Differential test: our LaTeX renderer against pylatexenc, the reference grader's renderer.

``cs336_alignment.rewards.latex_text.latex_to_text`` stands in for
``pylatexenc.latex2text.LatexNodes2Text().latex_to_text(expr)``, which the CS336 reference
grader (``drgrpo_grader.py``, ``_parse_latex``) runs on an answer before sympy. Both render:

* a seeded corpus (``generate_corpus``): 10,200 distinct inputs of at most 56 characters,
  always the same ones. Most are answer-like expressions from a small grammar (numbers,
  fractions braced or not, roots, scripts, fonts, ``\\left``/``\\right`` delimiters,
  intervals, sets, matrices and other environments, accents, symbols, unknown macros,
  spacing, degrees, ``\\%``, ``\\$``, inline and display math); about a quarter of those are
  damaged as model output is (a character inserted, deleted or swapped, the text cut
  short: unbalanced braces, stray backslashes, Unicode), and one in eight inputs is a
  short random sequence of LaTeX tokens standing for garbled output; plus empty and blank
  input;
* every macro and environment pylatexenc knows, with and without arguments and in math.

Every input must give the same outcome, which is what grading sees (``outcome``): the
reference keeps the unrendered string when its renderer raises, so "raised" is one
outcome whatever the exception; otherwise the text goes through the steps the reference
applies right after rendering, in its order (``grader_view``: six symbols become words,
the ends are stripped, ``- *`` becomes ``-``, spaces between two digits become ``+``,
spaces and braces are removed, letters are lower-cased). Differences those steps erase
cannot change a verdict. The only inputs left out are those of the classes listed in
docs/grading.md ("Fidelity to the reference"), which ``listed_difference`` names from the
input; each class has a bound (``LISTED_BOUNDS``) on the inputs it may exclude.

pylatexenc is a dev-only dependency (pinned in the ``dev`` extra, which CI installs); the
package itself never imports it. For speed the reference is called as
``nodelist_to_text(LatexWalker(s, latex_context=db).get_latex_nodes()[0])`` on one
``LatexNodes2Text`` and one parser context: that is the body of ``latex_to_text`` with
its per-call construction hoisted (neither object changes while rendering), and
``test_renderer_matches_pylatexenc`` checks it against the literal reference call on a sample.
"""

from __future__ import annotations

import functools
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

import pytest

from cs336_alignment.rewards import latex_text

latex2text = pytest.importorskip(
    "pylatexenc.latex2text", reason="pylatexenc (the reference's renderer, in the dev extra) is not installed"
)
latexwalker = pytest.importorskip("pylatexenc.latexwalker")

SEED = 5_336
CORPUS_SIZE = 10_200
MAX_LEN = 56
RAISED = "<raised>"
T = TypeVar("T")

# --- what grading sees --------------------------------------------------------------------

_SYMBOL_WORDS = (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*"))
_MINUS_SPACES = re.compile(r"- *")
_MIXED_NUMBER = re.compile(r"([0-9]) +([0-9])")


def grader_view(rendered: str) -> str:
    """The reference's steps right after rendering (end of ``_parse_latex``, then ``_normalize``)."""
    for symbol, word in _SYMBOL_WORDS:
        rendered = rendered.replace(symbol, word)
    rendered = rendered.strip()
    rendered = _MINUS_SPACES.sub("-", rendered)
    rendered = _MIXED_NUMBER.sub(r"\1+\2", rendered)
    return rendered.replace(" ", "").replace("{", "").replace("}", "").lower()


def outcome(render: Callable[[str], str], source: str) -> str:
    """``grader_view`` of the rendering, or ``RAISED`` when the renderer raises."""
    try:
        return grader_view(render(source))
    except Exception:  # noqa: BLE001 - the reference keeps the input on any exception
        return RAISED


# --- differences listed in docs/grading.md ------------------------------------------------

_CONVERTER_DB = latex2text.get_default_latex_context_db()
_PARSER_DB = latexwalker.get_default_latex_context_db()


def _macros(db, *categories: str) -> frozenset[str]:
    """The macros of pylatexenc's context ``db`` in the given categories."""
    return frozenset(spec.macroname for spec in db.iter_macro_specs(categories=list(categories)))


# Document structure and preamble: headings, title pages, list items, links, file input,
# verbatim text, footnotes, package loading, definitions, counters, lengths, colours.
# pylatexenc renders them as headings, dates or placeholders, raises on them, or drops
# their arguments; we render them as nothing and keep their groups. Answers never use them.
DOCUMENT_MACROS = frozenset(
    "title author date maketitle today item href part chapter section subsection subsubsection paragraph "
    "subparagraph texorpdfstring input include includegraphics verb footnote documentclass usepackage "
    "RequirePackage newcommand renewcommand providecommand newenvironment renewenvironment provideenvironment "
    "DeclareMathOperator setcounter addcounter setlength addlength definecolor providecolor colorlet rowcolors "
    "pagecolor hypersetup selectlanguage bibliography keywords boxframe pagagraph".split()
)
# The macros of two packages pylatexenc knows: natbib's citations (but \cite, \citep and
# \citet, which we render) and the German exercise-sheet package ethuebung.
PACKAGE_MACROS = (
    _macros(_PARSER_DB, "natbib", "latex-ethuebung") | _macros(_CONVERTER_DB, "latex-ethuebung")
) - {"cite", "citep", "citet"}
# Theorem-like, list and float environments: pylatexenc drops their optional argument.
OPTION_ENVIRONMENTS = frozenset(
    spec.environmentname for spec in _PARSER_DB.iter_environment_specs(categories=["theorems", "enumitem"])
) | {"figure", "figure*", "table", "table*"}
# Text-mode glyph macros not spelled \text...: letters of other alphabets, quotation marks.
TEXT_GLYPH_MACROS = frozenset(
    "th TH dh DH dj DJ ng NG ij IJ eth guillemotleft guillemotright guilsinglleft guilsinglright quotedblbase "
    "quotesinglbase openbracketleft openbracketright nolinebreak".split()
)
# pylatexenc's extended symbol tables (about 600 names from Unicode's lists of symbols):
# we render the math symbols answers use (relations, operators, arrows, dots, delimiters);
# not box and curly operators, rare arrow and harpoon forms, Mathematica-style names
# (\RightTeeVector), zodiac signs, planets, notes, archaic Greek letters.
EXTENDED_SYMBOL_MACROS = _macros(_CONVERTER_DB, "advanced-symbols", "nonstandard-qit")
_CONVERTER_MACROS = _macros(_CONVERTER_DB, *_CONVERTER_DB.categories())

# The most inputs each class may exclude: (corpus inputs, probes of every macro and environment).
LISTED_BOUNDS = {
    "document macro": (0, 46),
    "package macro": (0, 61),
    "document environment option": (0, 22),
    "Cyrillic letter": (0, 175),
    "text-mode glyph": (3, 113),
    "extended symbol": (2, 220),
}
_VERBATIM = re.compile(r"\s*\{verbatim\}")
_OPTION_ENVIRONMENT = re.compile(r"\s*\{([^{}]*)\}\s*\[")


@functools.lru_cache(maxsize=None)
def _missing_glyph(name: str) -> bool:
    """Whether pylatexenc renders ``\\name`` as a fixed character and we render it as nothing
    (compared as grading sees them)."""
    if name not in _CONVERTER_MACROS or outcome(latex_text.latex_to_text, "\\" + name) != "":
        return False
    glyph_x = outcome(_reference(), "\\" + name + "{x}")  # the glyph, then the group as itself
    return len(glyph_x) > 1 and glyph_x.endswith("x") and "%" not in glyph_x and glyph_x != RAISED


def _listed_macro(name: str) -> str | None:
    """The listed class of the macro ``\\name``, or None."""
    if name in DOCUMENT_MACROS:
        return "document macro"
    if name in PACKAGE_MACROS:
        return "package macro"
    if not _missing_glyph(name):
        return None
    if name.lower().startswith("cyr"):
        return "Cyrillic letter"
    if name.startswith("text") or name in TEXT_GLYPH_MACROS:
        return "text-mode glyph"
    return "extended symbol" if name in EXTENDED_SYMBOL_MACROS else None


def listed_difference(source: str) -> str | None:
    """The class listed in docs/grading.md of the first macro or environment of ``source`` in
    one, or None. Macro names are read as both renderers read them (letters after a backslash,
    or one other character)."""
    i = source.find("\\")
    while i >= 0:
        j = i + 1
        while j < len(source) and source[j].isalpha():
            j += 1
        name = source[i + 1 : j]
        listed = _listed_macro(name) if name else None
        if name == "begin" and _VERBATIM.match(source, j):
            listed = "document macro"
        option = _OPTION_ENVIRONMENT.match(source, j) if name == "begin" else None
        if option is not None and option.group(1) in OPTION_ENVIRONMENTS:
            listed = "document environment option"
        if listed is not None:
            return listed
        i = source.find("\\", max(j, i + 2))
    return None


# --- the corpus -----------------------------------------------------------------------------


class AnswerGrammar:
    """A seeded random generator of answer-like LaTeX, well-formed and malformed."""

    NUMBERS = ("0", "1", "2", "3", "5", "7", "10", "12", "25", "100", "2004", "0.5", ".5", "3.14", "1,000", "-1", "-4")
    LETTERS = ("x", "y", "a", "b", "n", "k", "t", "A", "B", "S")
    SYMBOLS = (
        r"\pi", r"\infty", r"\alpha", r"\theta", r"\Sigma", r"\cdot", r"\times", r"\pm", r"\mp", r"\le", r"\leq",
        r"\ge", r"\geq", r"\neq", r"\ne", r"\cup", r"\cap", r"\in", r"\circ", r"\ldots", r"\cdots", r"\dots",
        r"\to", r"\emptyset", r"\varnothing", r"\sin", r"\cos", r"\tan", r"\log", r"\ln", r"\angle", r"\triangle",
        r"\deg", r"\gcd", r"\approx", r"\sim", r"\div", r"\prime", r"\star", r"\mid", r"\perp", r"\parallel",
        r"\lfloor", r"\rfloor", r"\lceil", r"\rceil", r"\langle", r"\rangle", r"\vert", r"\|", r"\backslash",
    )
    OPERATORS = ("+", "-", "=", ",", ", ", "/", "*", " ", "<", ">", r"\cdot ", r"\times ", r"\pm ", r" \le ",
                 r"\geq ", r"\neq ", r"\cup ", r" \text{ or } ", r" \text{ and } ", ":", ";", "!", "'")
    WORDS = ("cm", " cm", "inches", "units^2", "dollars", "Evelyn", " or ", "yes", "No", "m/s", "degrees", "a",
             "x", "A B", "cm^2", "km/h", "")
    FONTS = (r"\text", r"\textbf", r"\textit", r"\mathrm", r"\mathbf", r"\mathbb", r"\mathcal", r"\mathit",
             r"\operatorname", r"\mbox", r"\texttt", r"\textsf", r"\emph", r"\mathsf", r"\mathfrak", r"\boxed")
    UNKNOWN = (r"\foo", r"\qux", r"\implies", r"\iff", r"\dbinom", r"\overrightarrow", r"\widehat", r"\cfrac",
               r"\displaystyle", r"\limits", r"\nolimits", r"\big", r"\Bigg", r"\mathop", r"\phantom")
    ACCENTS = (r"\overline", r"\underline", r"\hat", r"\bar", r"\vec", r"\tilde", r"\dot", r"\widetilde")
    UNICODE = ("é", "π", "√", "²", "−", "≤", "∞", "×", "·", "中", "°", "ü", "€", "α", "\xa0", "…", "ℝ", "½")
    SPACES = (r"\,", r"\;", r"\:", r"\!", r"\ ", r"\quad", r"\qquad", "~", " ", "  ", "\t", "\n")
    MATRICES = ("pmatrix", "bmatrix", "vmatrix", "matrix", "smallmatrix", "cases", "align*", "array")
    STRAY = ("{", "}", "\\", "\\\\", "^", "_", "&", "$", "[", "]", "(", ")", "#", "%", "'", "`", "--", "``", "''")
    SOUP = STRAY + SPACES + UNICODE[:6] + (
        "x", "1", "2", "*", "\n\n", "\r", "$$", "---", "!`", "\\(", "\\)", "\\[", "\\]", "\\[2pt]", "\\\\*", "\\{", "\\}", "\\%",
        "\\frac", "\\sqrt", "\\sqrt[", "\\text", "\\mbox", "\\hat", "\\'", "\\not", "\\mathbb", "\\colorbox", "\\textcolor",
        "\\pi", "\\foo", "\\begin", "\\end", "\\begin{pmatrix}", "\\end{pmatrix}", "\\begin{align}", "\\end{align}",
        "\\begin{array}", "\\begin{center}", "\\end{center}", "\\left(", "\\right)", "\\hspace*",
    )

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        # (cumulative probability, builder) for a term of an expression
        self.builders = (
            (0.30, self.atom), (0.42, self.fraction), (0.49, self.root), (0.58, self.script), (0.65, self.font),
            (0.73, self.delimited), (0.76, self.matrix), (0.80, self.money_percent_degree), (0.84, self.group),
            (0.87, self.accent), (0.90, self.unknown_macro), (0.94, self.spacing), (1.00, self.misc),
        )

    def pick(self, options: Sequence[T]) -> T:
        return options[int(self.rng.random() * len(options))]

    # expressions -----------------------------------------------------------------------
    def expr(self, depth: int) -> str:
        parts = [self.term(depth)]
        for _ in range(self.rng.choice((0, 0, 1, 1, 2, 3))):
            parts.append(self.pick(self.OPERATORS))
            parts.append(self.term(depth))
        return "".join(parts)

    def atom(self, depth: int = 0) -> str:
        """A number, letter, symbol or non-ASCII character (``depth``: as the other builders)."""
        roll = self.rng.random()
        if roll < 0.45:
            return self.pick(self.NUMBERS)
        if roll < 0.7:
            return self.pick(self.LETTERS)
        if roll < 0.95:
            return self.pick(self.SYMBOLS)
        return self.pick(self.UNICODE)

    def term(self, depth: int) -> str:
        if depth <= 0:
            return self.atom()
        roll = self.rng.random()
        for threshold, build in self.builders:
            if roll < threshold:
                return build(depth - 1)
        raise AssertionError("unreachable")  # pragma: no cover

    def arg(self, depth: int) -> str:
        """A macro argument: braced, or a bare character or macro (``\\frac12``)."""
        roll = self.rng.random()
        if roll < 0.7:
            return "{" + self.expr(depth) + "}"
        if roll < 0.85:
            return self.rng.choice("0123456789xyn")
        if roll < 0.93:
            return self.pick(self.SYMBOLS)
        return " " + self.rng.choice("123xy") if self.rng.random() < 0.5 else " {" + self.expr(depth) + "}"

    def fraction(self, depth: int) -> str:
        macro = self.pick((r"\frac", r"\frac", r"\frac", r"\dfrac", r"\tfrac", r" \frac"))
        if self.rng.random() < 0.15:
            return macro + self.rng.choice("0123456789") + self.rng.choice("0123456789")  # \frac12
        return macro + self.arg(depth) + self.arg(depth)

    def root(self, depth: int) -> str:
        index = self.pick(("", "", "", "[3]", "[n]", "[4]", "[]", " [3]"))
        return r"\sqrt" + index + self.arg(depth)

    def script(self, depth: int) -> str:
        base = self.term(depth) if self.rng.random() < 0.3 else self.atom()
        mark = self.pick(("^", "^", "_", "'", "''", "^{\\prime}"))
        if mark in ("'", "''", "^{\\prime}"):
            return base + mark
        tail = self.pick(("2", "3", "n", "{2}", "{-1}", r"\circ", r"{\circ}", r"\infty", "{" + self.expr(depth) + "}",
                          "{" + self.expr(depth) + "}", " 2", "{}", "x"))
        return base + mark + tail

    def font(self, depth: int) -> str:
        macro = self.pick(self.FONTS)
        body = self.pick(self.WORDS) if self.rng.random() < 0.5 else self.expr(depth)
        return macro + "{" + body + "}"

    def delimited(self, depth: int) -> str:
        inner = self.expr(depth)
        if self.rng.random() < 0.3:
            inner = self.expr(depth) + ", " + self.expr(depth)
        roll = self.rng.random()
        if roll < 0.25:
            left, right = self.pick(((r"\left(", r"\right)"), (r"\left[", r"\right]"), (r"\left(", r"\right]"),
                                     (r"\left\{", r"\right\}"), (r"\left|", r"\right|"), (r"\left.", r"\right|"),
                                     (r"\left\lfloor", r"\right\rfloor"), (r"\left\langle", r"\right\rangle"),
                                     (r"\left (", r"\right )"), (r"\bigl(", r"\bigr)")))
            return left + " " + inner + " " + right
        if roll < 0.5:
            return self.pick(("(", "[", "(", r"(-\infty", "[0")) + ", " + inner + self.pick((")", "]", r"\infty)", ")"))
        if roll < 0.75:
            return r"\{" + inner + r"\}"
        return self.pick(("(", "[", "|")) + inner + self.pick((")", "]", "|"))

    def matrix(self, depth: int) -> str:
        env = self.pick(self.MATRICES)
        colspec = "{" + self.pick(("cc", "c|c", "rl", "")) + "}" if env == "array" else ""
        rows = []
        for _ in range(self.rng.randint(1, 3)):
            cells = [self.expr(max(depth - 1, 0)) for _ in range(self.rng.randint(1, 3))]
            rows.append(self.pick((" & ", "&", "&&")).join(cells))
        sep = self.pick((r" \\ ", r"\\", r"\\[2pt]", r" \\"))
        return rf"\begin{{{env}}}{colspec}" + sep.join(rows) + self.pick(("", " ", sep)) + rf"\end{{{env}}}"

    def money_percent_degree(self, depth: int) -> str:
        value = self.pick(self.NUMBERS) if self.rng.random() < 0.7 else self.expr(depth)
        return self.pick((r"\${}", r"{}\%", r"{}^\circ", r"{}^{{\circ}}", r"{}^\circ C", r"{}\,\%", r"\$ {}",
                          r"{}\textdegree", r"{}^\circ\text{{F}}", r"{} \%")).format(value)

    def group(self, depth: int) -> str:
        return self.pick(("{{{}}}", "{{{{{}}}}}", "{{ {} }}", "{}{{}}")).format(self.expr(depth))

    def accent(self, depth: int) -> str:
        return self.pick(self.ACCENTS) + self.arg(depth)

    def unknown_macro(self, depth: int) -> str:
        macro = self.pick(self.UNKNOWN)
        roll = self.rng.random()
        if roll < 0.4:
            return macro
        if roll < 0.7:
            return macro + "{" + self.expr(depth) + "}"
        if roll < 0.85:
            return macro + "{" + self.expr(depth) + "}{" + self.expr(depth) + "}"
        return macro + " " + self.atom()

    def spacing(self, depth: int) -> str:
        return self.pick(self.SPACES) + self.term(depth)

    def misc(self, depth: int) -> str:
        return self.pick((
            r"\binom{{{}}}{{2}}", r"\not= {}", r"\not\in {}", r"\mathbb{{R}}", r"\mathbb{{Z}}^+", r"f({})",
            r"\sin^2 {}", r"\log_2 {}", r"\lim_{{x\to 0}} {}", r"\sum_{{k=1}}^n {}", r"\int_0^1 {}\,dx",
            r"{}!", r"|{}|", r"\ref{{{}}}", r"\hspace{{1cm}}{}", r"\color{{red}}{}", r"\textcolor{{red}}{{{}}}",
            r"{} \\ {}", r"{} \\[2pt] {}", r"$ {} $", r"\( {} \)", r"\[ {} \]", r"\mbox{{{}}}", r"\label{{eq}}{}",
        )).format(self.expr(depth), self.expr(depth))

    # malformed input -------------------------------------------------------------------
    def mutate(self, text: str) -> str:
        """Damage ``text``: insert, delete, swap or truncate at random places."""
        for _ in range(self.rng.randint(1, 2)):
            pos = self.rng.randint(0, len(text))
            roll = self.rng.random()
            if roll < 0.4:
                text = text[:pos] + self.pick(self.STRAY) + text[pos:]
            elif roll < 0.6:
                text = text[:pos] + text[pos + 1 :]
            elif roll < 0.75 and pos + 1 < len(text):
                text = text[:pos] + text[pos + 1] + text[pos] + text[pos + 2 :]
            elif roll < 0.9:
                text = text[:pos]
            else:
                text = text[:pos] + self.pick(self.UNICODE) + text[pos:]
        return text

    def soup(self) -> str:
        """A short random sequence of LaTeX tokens: malformed input of every kind."""
        atoms = self.SOUP
        return "".join(self.pick(atoms) for _ in range(self.rng.randint(1, 9)))

    def answer(self) -> str:
        """One input: mostly answer-like expressions (about a quarter of them damaged), some token soup."""
        roll = self.rng.random()
        if roll < 0.02:
            return "".join(self.pick(self.SPACES + self.STRAY + self.UNICODE) for _ in range(self.rng.randint(0, 3)))
        if roll < 0.15:
            return self.soup()
        text = self.expr(self.rng.choice((1, 1, 2, 2, 3)))
        if roll < 0.38:
            text = self.mutate(text)
        if self.rng.random() < 0.1:
            text = self.pick((" ", "  ", "\n", "\t")) + text + self.pick(("", " ", "\n"))
        return text


def generate_corpus(size: int = CORPUS_SIZE, seed: int = SEED, max_len: int = MAX_LEN) -> list[str]:
    """``size`` distinct inputs of at most ``max_len`` characters, always the same ones for a seed."""
    grammar = AnswerGrammar(seed)
    corpus = ["", " ", "\n", "\\", "{", "}", "x", "\\frac", "\\sqrt", "\\begin{pmatrix}\\end{pmatrix}"]
    seen = set(corpus)
    while len(corpus) < size:
        text = grammar.answer()
        if len(text) <= max_len and text not in seen:
            seen.add(text)
            corpus.append(text)
    return corpus


# --- the reference --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _reference() -> Callable[[str], str]:
    """pylatexenc's ``latex_to_text`` with its per-call construction hoisted (see the module docstring)."""
    converter = latex2text.LatexNodes2Text()
    context = latexwalker.get_default_latex_context_db()

    def render(source: str) -> str:
        return converter.nodelist_to_text(latexwalker.LatexWalker(source, latex_context=context).get_latex_nodes()[0])

    return render


@pytest.fixture(scope="module")
def quiet_pylatexenc():
    """pylatexenc logs every forgiven parse error; keep the test output and time free of it."""
    logger = logging.getLogger("pylatexenc")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_corpus()


@pytest.fixture(scope="module")
def reference_outcomes(corpus, quiet_pylatexenc) -> list[str]:
    render = _reference()
    return [outcome(render, source) for source in corpus]


def _disagreements(corpus: list[str], expected: list[str], render: Callable[[str], str]) -> list[tuple[str, str, str]]:
    return [
        (source, theirs, mine)
        for source, theirs in zip(corpus, expected)
        if (mine := outcome(render, source)) != theirs and listed_difference(source) is None
    ]


def _report(disagreements: list[tuple[str, str, str]]) -> str:
    lines = [f"{len(disagreements)} inputs render differently (input, pylatexenc, ours, after grader_view):"]
    lines += [f"  {source!r}: {theirs!r} != {mine!r}" for source, theirs, mine in disagreements[:20]]
    return "\n".join(lines)


# --- tests --------------------------------------------------------------------------------------


def test_corpus_is_seeded_large_and_distinct(corpus) -> None:
    assert len(corpus) >= 10_000
    assert len(set(corpus)) == len(corpus)
    assert all(len(source) <= MAX_LEN for source in corpus)
    assert generate_corpus(300) == corpus[:300]  # the same seed gives the same inputs
    assert generate_corpus(300, seed=SEED + 1) != corpus[:300]


@pytest.mark.parametrize(
    ("construct", "pattern"),
    [
        ("\\frac with braces", r"\\frac\{"), ("\\frac12", r"\\frac\d\d"), ("\\frac without braces", r"\\frac ?[\dxyn\\]"),
        ("\\dfrac", r"\\dfrac"), ("\\tfrac", r"\\tfrac"), ("\\sqrt", r"\\sqrt\{"), ("\\sqrt[3]", r"\\sqrt\[3\]"),
        ("\\text", r"\\text\{"), ("\\mathrm", r"\\mathrm"), ("\\mathbf", r"\\mathbf"),
        ("\\left( \\right)", r"\\left\(.*\\right\)"),
        ("\\left\\{", r"\\left\\\{"), ("superscript", r"\^"), ("subscript", r"_"), ("\\pi", r"\\pi(?![a-z])"),
        ("\\infty", r"\\infty"), ("\\cdot", r"\\cdot"), ("\\times", r"\\times"), ("\\pm", r"\\pm"), ("\\le", r"\\le(?![a-z])"),
        ("degrees", r"\^\\circ|\^\{\\circ\}"), ("\\%", r"\\%"), ("\\$", r"\\\$"), ("interval", r"^[(\[].*,.*[)\]]$"),
        ("set", r"\\\{.*\\\}"), ("pmatrix", r"\\begin\{pmatrix\}"), ("nested braces", r"\{[^{}]*\{"),
        ("unknown macro", r"\\(foo|qux|implies|cfrac)"), ("non-ASCII", r"[^\x00-\x7f]"), ("comment", r"%"),
        ("math shift", r"(?<!\\)\$"), ("line break", r"\n"), ("display math", r"\\\[|\$\$"),
        ("final backslash", r"(?<!\\)(\\\\)*\\$"), ("\\\\[2pt]", r"\\\\\[2pt\]"), ("\\\\*", r"\\\\\*"),
        ("\\not", r"\\not(?![a-z])"), ("accent", r"\\(hat|bar|vec|tilde)(?![a-z])"), ("typographic special", r"--|``|''|~"),
        ("\\end without its \\begin", r"^(?:(?!\\begin).)*\\end"),
    ],
)
def test_corpus_covers(corpus, construct: str, pattern: str) -> None:
    """Every construct the corpus is meant to exercise appears in at least 20 inputs."""
    regex = re.compile(pattern)
    assert sum(1 for source in corpus if regex.search(source)) >= 20, construct


def test_corpus_covers_malformed_input(corpus) -> None:
    unbalanced = sum(1 for source in corpus if source.count("{") != source.count("}"))
    blank = sum(1 for source in corpus if not source.strip())
    assert unbalanced >= 500 and blank >= 5 and "" in corpus


def _check_listed(sources: list[str], which: int, label: str) -> Counter[str]:
    """Count the ``sources`` each listed class excludes, print the counts, and hold them to
    ``LISTED_BOUNDS`` (``which``: 0 for the corpus, 1 for the probes)."""
    excluded = Counter(filter(None, map(listed_difference, sources)))
    print(f"\n{label} excluded per listed class: {dict(sorted(excluded.items()))}")
    too_many = {name: count for name, count in excluded.items() if count > LISTED_BOUNDS[name][which]}
    assert not too_many, f"listed classes exclude more {label} than their bounds allow: {too_many}"
    return excluded


def test_renderer_matches_pylatexenc(corpus, reference_outcomes) -> None:
    disagreements = _disagreements(corpus, reference_outcomes, latex_text.latex_to_text)
    assert not disagreements, _report(disagreements)
    _check_listed(corpus, 0, "corpus inputs")
    # The hoisted reference call is the reference call.
    for source in corpus[::150]:
        assert outcome(latex2text.LatexNodes2Text().latex_to_text, source) == outcome(_reference(), source), source


def test_every_pylatexenc_macro_and_environment(quiet_pylatexenc) -> None:
    """Each macro pylatexenc's parser or renderer knows, and each environment, renders the same
    bare, with arguments, and in math (which keeps the space after a macro without arguments)."""
    macros = {spec.macroname for spec in _CONVERTER_DB.iter_macro_specs()}
    macros |= {spec.macroname for spec in _PARSER_DB.iter_macro_specs()}
    environments = {spec.environmentname for spec in _CONVERTER_DB.iter_environment_specs()}
    environments |= {spec.environmentname for spec in _PARSER_DB.iter_environment_specs()}
    sources = [f"\\{name}*[o]{{a}}{{b}}c$1\\{name} 2$\\frac\\{name}3" for name in sorted(macros)]
    sources += [f"\\begin{{{name}}}[o]{{c}} 1 & \\pi 2\\\\[2pt] \\alpha\\end{{{name}}}x" for name in sorted(environments)]
    reference = _reference()
    disagreements = _disagreements(sources, [outcome(reference, source) for source in sources], latex_text.latex_to_text)
    assert not disagreements, _report(disagreements)
    assert len(sources) > 900
    _check_listed(sources, 1, "probes")


def test_listed_classes_leave_answers_alone(quiet_pylatexenc) -> None:
    """The exclusions are narrow: no answer-like input and no math symbol we render falls in a
    listed class, and each glyph class holds only macros we render as nothing."""
    answers = ["\\frac{1}{2}", "\\sqrt[3]{x}", "\\text{th}", "\\theta", "\\prec", "\\textdegree", "\\rightleftharpoons",
               "\\begin{pmatrix}1\\end{pmatrix}", "\\begin{cases}1&x\\end{cases}"]
    assert [listed_difference(source) for source in answers] == [None] * len(answers)
    assert listed_difference("\\th") == "text-mode glyph" and listed_difference("x\\CYRA") == "Cyrillic letter"
    assert listed_difference("\\aries") == "extended symbol" and listed_difference("\\\\section") is None


@pytest.mark.parametrize("broken", [lambda source: source, lambda source: ""], ids=["identity", "empty"])
def test_comparison_catches_a_broken_renderer(corpus, reference_outcomes, broken) -> None:
    """The comparison has teeth: a renderer that does nothing disagrees on most inputs."""
    assert len(_disagreements(corpus, reference_outcomes, broken)) > len(corpus) // 2
