"""Render LaTeX math answers as plain text, the way the reference grader sees them.

The reference grader turns a LaTeX answer into plain text with the ``pylatexenc`` package
before handing it to sympy. This module is our own renderer in its place, written from
pylatexenc's observable behaviour; ``tests/test_latex_differential.py`` compares the two
on a large generated corpus and lists where they differ (docs/grading.md). The rules:

* ``\\frac{a}{b}`` becomes ``a/b`` (no parentheses, so ``\\frac{a+b}{c}`` reads as
  ``a+b/c``), ``\\sqrt[n]{x}`` becomes ``√(x)``; ``\\overline{x}`` and kin keep their argument;
* symbol macros become Unicode characters (``\\pi`` -> ``π``, ``\\le`` -> ``≤``), function
  names stay words (``\\sin``); unknown macros vanish while the groups after them stay
  (``\\binom{5}{2}`` -> ``52``, ``\\ne`` -> nothing); a few macros drop their argument (``\\mbox``);
* ``\\mathbb{R}``-style alphabets give mathematical letters; accents (and ``\\not``) combine
  with each character of their argument;
* an argument is a group or one token (``\\frac12``, ``\\frac\\pi2``, ``\\sqrt--``), empty at a
  ``}``; when the input ends first, the macro renders without its arguments (``\\frac`` ->
  ``%s/%s``) and what it read renders as text;
* ``%`` starts a comment; ``--``, ``~``, ``''`` and kin are typographic characters;
  ``&`` is three spaces and ``\\\\`` a newline;
* math (``$...$``, ``\\(...\\)``) is stripped and drops blank text between constructs but keeps
  the space after a macro without arguments before ordinary text; display math (``$$``,
  ``\\[...\\]``, ``equation``, ``align``, ...) also goes on indented lines of its own;
* matrices render as ``[ a b; c d ]`` (cells right-aligned to the widest), other
  environments as their content.

Spacing follows the reference because a space between two digits reads as a mixed number.
``latex_to_text`` raises ``LatexRenderError`` where the reference's renderer raises, so
callers can keep the original string exactly as the reference does.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = [
    "LatexRenderError",
    "latex_to_text",
]


class LatexRenderError(ValueError):
    """Raised for input the reference renderer also fails on (e.g. ``\\sqrt`` with no argument)."""


# --- macro tables -----------------------------------------------------------------------


def _pairs(text: str) -> dict[str, str]:
    """``"le ≤ ge ≥"`` -> ``{"le": "≤", "ge": "≥"}``."""
    words = text.split()
    return dict(zip(words[::2], words[1::2]))


_GREEK_LETTERS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
                  "upsilon phi chi psi omega").split()
_GREEK = {
    **{name: unicodedata.lookup("GREEK SMALL LETTER " + name.upper().replace("LAMBDA", "LAMDA")) for name in _GREEK_LETTERS},
    **{name.capitalize(): unicodedata.lookup("GREEK CAPITAL LETTER " + name.upper().replace("LAMBDA", "LAMDA"))
       for name in _GREEK_LETTERS},
    **_pairs("epsilon ϵ varepsilon ε phi ϕ varphi φ vartheta ϑ varpi ϖ varrho ϱ varsigma ς varkappa ϰ digamma ϝ Digamma Ϝ"),
}

# Symbol macros and what they render as. Macros absent from every table are unknown and
# render as nothing (e.g. \ne, \gcd, \triangle, \implies, \iff are unknown to the reference).
_SYMBOLS = {
    **_GREEK,
    **_pairs(  # relations
        "le ≤ leq ≤ ge ≥ geq ≥ neq ≠ leqslant ⩽ geqslant ⩾ leqq ≦ geqq ≧ ll ≪ gg ≫ lessgtr ≶ gtrless ≷ lesssim ≲ "
        "gtrsim ≳ lessapprox ⪅ gtrapprox ⪆ lneqq ≨ gneqq ≩ nless ≮ ngtr ≯ nleq ≰ ngeq ≱ prec ≺ succ ≻ preceq ≼ succeq ≽ "
        "preccurlyeq ≼ succcurlyeq ≽ precsim ≾ succsim ≿ nprec ⊀ nsucc ⊁ approx ≈ approxeq ≊ sim ∼ backsim ∽ simeq ≃ "
        "cong ≅ equiv ≡ asymp ≍ doteq ≐ triangleq ≜ propto ∝ perp ⊥ parallel ∥ nparallel ∦ mid | nmid ∤ in ∈ notin ∉ "
        "ni ∋ subset ⊂ supset ⊃ subseteq ⊆ supseteq ⊇ subseteqq ⫅ supseteqq ⫆ subsetneq ⊊ supsetneq ⊋ subsetneqq ⫋ "
        "supsetneqq ⫌ nsubseteq ⊈ nsupseteq ⊉ sqsubset ⊏ sqsupset ⊐ sqsubseteq ⊑ sqsupseteq ⊒ vdash ⊢ dashv ⊣ top ⊤ "
        "vartriangleleft ⊲ vartriangleright ⊳ trianglelefteq ⊴ trianglerighteq ⊵"),
    **_pairs(  # operators
        "pm ± mp ∓ times × div ÷ cdot · ast ∗ star ⋆ circ ∘ bullet ∙ bigcirc ◯ oplus ⊕ ominus ⊖ otimes ⊗ oslash ⊘ odot ⊙ "
        "circledast ⊛ cup ∪ cap ∩ uplus ⊎ sqcup ⊔ sqcap ⊓ setminus ∖ smallsetminus ∖ wedge ∧ vee ∨ lnot ¬ dagger † dag † "
        "sum ∑ prod ∏ coprod ∐ int ∫ iint ∬ iiint ∭ oint ∮ bigcup ⋃ bigcap ⋂ bigvee ⋁ bigwedge ⋀ bigoplus ⊕ bigotimes ⊗ "
        "partial ∂ nabla ∇ surd √"),
    **_pairs(  # arrows
        "to → rightarrow → leftarrow ← leftrightarrow ↔ Rightarrow ⇒ Leftarrow ⇐ Leftrightarrow ⇔ longrightarrow ⟶ "
        "longleftarrow ⟵ longleftrightarrow ⟷ Longrightarrow ⟹ Longleftarrow ⟸ Longleftrightarrow ⟺ mapsto ↦ "
        "longmapsto ⟼ uparrow ↑ downarrow ↓ updownarrow ↕ Uparrow ⇑ Downarrow ⇓ Updownarrow ⇕ nearrow ↗ searrow ↘ "
        "swarrow ↙ nwarrow ↖ hookleftarrow ↩ hookrightarrow ↪ twoheadleftarrow ↞ twoheadrightarrow ↠ leftharpoonup ↼ "
        "leftharpoondown ↽ rightharpoonup ⇀ rightharpoondown ⇁ rightleftharpoons ⇌ nleftarrow ↚ nrightarrow ↛ "
        "nLeftarrow ⇍ nRightarrow ⇏ nleftrightarrow ↮ nLeftrightarrow ⇎"),
    **_pairs(  # other symbols, dots and delimiters
        "infty ∞ emptyset ∅ varnothing ∅ forall ∀ exists ∃ nexists ∄ complement ∁ angle ∠ measuredangle ∡ "
        "bigtriangleup △ bigtriangledown ▽ triangleleft ◃ triangleright ▹ square □ blacksquare ▪ diamond ♢ therefore ∴ "
        "because ∵ prime ' ell ℓ hbar ħ hslash ℏ aleph ℵ wp ℘ textdegree ° textcelsius ℃ textregistered ® ldots … dots … "
        "dotsm … dotsc … dotsb … dotsi … dotso … cdots ⋯ vdots ⋮ ddots ⋱ iddots ⋰ udots ⋰ lfloor ⌊ rfloor ⌋ lceil ⌈ "
        "rceil ⌉ langle ⟨ rangle ⟩ lbrace { rbrace } lvert | rvert | vert | Vert ‖ lVert ‖ rVert ‖ backslash \\ "
        "textbackslash \\ ss ß O Ø o ø i ı j ȷ ae æ AE Æ oe œ OE Œ aa å AA Å l ł L Ł"),
    # function names keep their spelling
    **{name: name for name in (
        "sin", "cos", "tan", "sinh", "cosh", "tanh", "arcsin", "arccos", "arctan", "arcsinh", "arccosh", "arctanh",
        "log", "ln", "exp", "lim", "max", "min", "inf", "sup")},
    "liminf": "lim inf", "limsup": "lim sup",
    # spacing, and one-character macros (a backslash followed by a non-letter)
    "quad": "  ", "qquad": "    ", "enskip": "\u2002",
    "textfrac": "%s/%s",  # the reference's parser reads no arguments for it
    ",": " ", ";": " ", ":": " ", " ": " ", "!": "", "{": "{", "}": "}", "$": "$", "%": "%", "&": "&", "#": "#",
    "_": "_", "|": "", ")": "", "]": "", "-": "\xad",
}

# Macros with mandatory arguments: (count, text with the arguments, text without them;
# None: fail, as the reference does). Those in _OPTIONAL also take a [...] argument first,
# those in _STARRED a '*'. Arguments the text leaves out are not rendered (so cannot fail),
# except for the macros in _RENDERS_ALL.
_FORMATS = {
    "frac": (2, "{0}/{1}", "%s/%s"), "nicefrac": (2, "{0}/{1}", "%s/%s"),
    "sqrt": (1, "√({0})", None), "url": (1, "<{0}>", "<%s>"),
    "bra": (1, "⟨{0}|", "⟨%s|"), "ket": (1, "|{0}⟩", "|%s⟩"), "braket": (2, "⟨{0}|{1}⟩", "⟨%s|%s⟩"),
    "ketbra": (2, "|{0}⟩⟨{1}|", "|%s⟩⟨%s|"),
    "textcolor": (2, "{1}", None), "colorbox": (2, "{1}", None), "fcolorbox": (3, "{2}", None),
    "vspace": (1, "\n", "\n"), "eqref": (1, "(<ref>)", "(<ref>)"), "Cref": (1, "<Ref>", "<Ref>"),
    **dict.fromkeys(("ref", "cref", "autoref"), (1, "<ref>", "<ref>")),
    **dict.fromkeys(("cite", "citep", "citet"), (1, "<cit.>", "<cit.>")),
    # the argument is kept (text fonts render nothing without it) or dropped
    **dict.fromkeys("text textbf textit textrm textsl textsc emph mathrm".split(), (1, "{0}", "")),
    **dict.fromkeys(
        "overline underline widehat widetilde wideparen overrightarrow overleftarrow overleftrightarrow underrightarrow "
        "underleftarrow underleftrightarrow overbrace underbrace overbracket underbracket overgroup undergroup "
        "overlinesegment underlinesegment overleftharpoon overrightharpoon".split(), (1, "{0}", "%s")),
    **dict.fromkeys(
        "mbox textsf texttt textup textmd hphantom vphantom label hspace color ensuremath xrightarrow "
        "xleftarrow".split(), (1, "", "")),
}
_OPTIONAL = {"sqrt", "textcolor", "colorbox", "fcolorbox", "xrightarrow", "xleftarrow", "cite", "citep", "citet", "array"}
_STARRED = {"hspace", "vspace", "cite", "citep", "citet"}
_RENDERS_ALL = {"sqrt", "textcolor", "colorbox", "fcolorbox"}  # even those their text leaves out
_TEXT_ARGS = {"text", "textbf", "textit", "textrm", "textsl", "textsc"}  # their argument is read as text, even in $...$

# Combining marks for accent macros (math and text accents); the accent applies to each
# character of its argument and is composed where Unicode has a precomposed character.
_ACCENTS = {
    "hat": "\u0302", "bar": "\u0305", "vec": "\u20d7", "dot": "\u0307", "ddot": "\u0308",
    "tilde": "\u0303", "check": "\u030c", "breve": "\u0306", "acute": "\u0301",
    "grave": "\u0300", "not": "\u0338",
    "'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303", "=": "\u0304",
    ".": "\u0307", "c": "\u0327", "v": "\u030c", "u": "\u0306", "H": "\u030b", "r": "\u030a",
    "b": "\u0331", "d": "\u0323", "k": "\u0328",
}
_DOTLESS = {"ı": "i", "ȷ": "j"}  # an accent on a dotless i or j gives the plain letter its accent

# Mathematical alphabets: macro -> Unicode style name (letters only; digits unchanged).
_ALPHABETS = {
    "mathbb": "DOUBLE-STRUCK", "mathbf": "BOLD", "mathit": "ITALIC", "mathcal": "SCRIPT",
    "mathscr": "SCRIPT", "mathfrak": "FRAKTUR", "mathtt": "MONOSPACE", "mathsf": "SANS-SERIF",
}
# Letters that live in the Letterlike Symbols block instead of the math alphanumerics.
_LETTERLIKE = {
    ("ITALIC", "h"): "ℎ",
    **{("DOUBLE-STRUCK", c): unicodedata.lookup(f"DOUBLE-STRUCK CAPITAL {c}") for c in "CHNPQRZ"},
    **{("SCRIPT", c): unicodedata.lookup(f"SCRIPT CAPITAL {c}") for c in "BEFHILMR"},
    **{("SCRIPT", c): unicodedata.lookup(f"SCRIPT SMALL {c.upper()}") for c in "ego"},
    **{("FRAKTUR", c): unicodedata.lookup(f"BLACK-LETTER CAPITAL {c}") for c in "CHIRZ"},
}

# Environments rendered as a bracketed matrix "[ a b; c d ]".
_MATRIX_ENVS = {"pmatrix", "bmatrix", "array", "smallmatrix", "psmallmatrix", "bsmallmatrix"}
# Environments whose arguments (column specifications and widths) are dropped (array: after a [...] one).
_ENV_ARGS = {"array": 1, "tabular": 1, "alignat": 1, "alignat*": 1, "tabular*": 2, "tabularx": 2}
# Display-math environments, and blocks surrounded by newlines.
_MATH_ENVS = {name + star for name in ("equation", "align", "gather", "multline", "eqnarray", "dmath") for star in ("", "*")}
_BLOCK_ENVS = {"center", "flushleft", "flushright"}

# Math delimiters that are macros, and their closing ones.
_MATH_OPEN = {"(": "\\)", "[": "\\]"}
# Specials: character sequences that render as one character.
_SPECIALS = {"---": "—", "--": "–", "``": "“", "''": "”", "!`": "¡", "?`": "¿", "~": "\xa0", "&": "   "}
_SPECIAL = re.compile(r"---|--|``|''|!`|\?`|~|&")
_PLAIN_START = frozenset("\\{}$%&~-`'!?")  # the characters that may start something other than text
_ENV_NAME = re.compile(r"\s*\{([\w*. -]+)\}")  # after \begin or \end
# A run of ordinary text: up to a macro, group, math, comment or special. A \begin or \end
# without an environment name is ordinary text too.
_CHARS = re.compile(
    r"(?:[^\\{}$%&~\-`'!?]|-(?!-)|`(?!`)|'(?!')|[!?](?!`)|\\(?:begin|end)(?![^\W\d_]|" + _ENV_NAME.pattern + "))+"
)
_CHARS_IN_BRACKETS = re.compile(_CHARS.pattern.replace("[^", "[^[\\]", 1))  # inside [...], brackets count
_PLAIN_GROUP = re.compile(r"([^\\{}$%&~\-`'!?]*)\}")  # a group of ordinary text only, up to its '}'
_COMMENT = re.compile(r"%[^\n\r]*")
_WHITE = re.compile(r"\s*")
_SPACE = re.compile(r"(?:(?!\n\n)\s)*")  # white space up to a paragraph break (a blank line)
_BLANK = re.compile(r"(?:(?!\n\n)\s|%[^\n\r]*)*")  # the same, and comments
_ASCII_LETTERS = re.compile(r"[a-zA-Z]*")


def _styled(style: str, ch: str) -> str:
    """``ch`` in a mathematical alphabet (letters only)."""
    if not ("a" <= ch <= "z" or "A" <= ch <= "Z"):
        return ch
    special = _LETTERLIKE.get((style, ch))
    if special is not None:
        return special
    case = "CAPITAL" if ch.isupper() else "SMALL"
    return unicodedata.lookup(f"MATHEMATICAL {style} {case} {ch.upper()}")


def _accented(text: str, mark: str) -> str:
    """Each character of ``text`` with the combining ``mark``, composed where Unicode can."""
    return "".join(unicodedata.normalize("NFC", _DOTLESS.get(ch, ch) + mark) for ch in text)


def _display(text: str) -> str:
    """Display math: on lines of its own, each line indented."""
    return "\n    " + text.strip().replace("\n", "\n    ") + "\n"


# --- renderer ---------------------------------------------------------------------------


class _Renderer:
    """A small recursive-descent LaTeX reader that renders each construct as it reads it."""

    __slots__ = ("s", "n", "i", "math", "failures", "unclosed")

    def __init__(self, source: str) -> None:
        self.s = source
        self.n = len(source)
        self.i = 0
        self.math = ""  # in math: what closes it ("$", "$$", "\\)", "\\]", or an environment's name)
        self.failures = 0  # constructs the reference fails on (the whole render then fails)
        # Renders of groups and [...] arguments that ran to the end of input, by kind and start:
        # a macro that then misses an argument has them read again as ordinary input.
        self.unclosed: dict[tuple[str, int, str], tuple[str, int]] | None = None

    # low-level scanning ----------------------------------------------------------------
    def _name(self) -> str:
        """Read a macro name after its backslash: letters, or one other character ('' at the end)."""
        s, i, n = self.s, self.i, self.n
        if i < n and not s[i].isalpha():
            self.i += 1
            return s[i]
        j = _ASCII_LETTERS.match(s, i).end()
        while j < n and s[j].isalpha():  # letters beyond ASCII
            j += 1
        self.i = j
        return s[i:j]

    def _at_end(self, env: str | None = None) -> bool:
        """Whether ``\\end`` starts here (followed by ``{env}`` if one is given)."""
        s, i = self.s, self.i
        if not s.startswith("\\end", i) or (i + 4 < self.n and s[i + 4].isalpha()):
            return False
        match = _ENV_NAME.match(s, i + 4) if env else None
        return not env or (match is not None and match.group(1) == env)

    def _bracket(self, rendered: bool = False) -> bool:
        """Read a ``[...]`` argument if one follows (brackets nest; it is parsed like any input,
        then dropped: a failure in it counts only if it is ``rendered``); False if it is unclosed."""
        s, start = self.s, self.i
        if start < self.n and (s[start].isspace() or s[start] == "%"):
            start = _BLANK.match(s, start).end()
        if start >= self.n or s[start] != "[":
            return True
        key = ("[", start, self.math)
        if self.unclosed and key in self.unclosed:
            self.i = self.n
            return False
        self.i, depth, failures = start, 0, self.failures
        while self.i < self.n and not (depth == 0 and self.i > start):
            ch = s[self.i]
            if ch in "[]}":  # a stray '}' is dropped
                depth += (ch == "[") - (ch == "]")
                self.i += 1
            else:
                self._node(_CHARS_IN_BRACKETS)
        if not rendered or depth:
            self.failures = failures
        if depth:
            self.unclosed = self.unclosed or {}
            self.unclosed[key] = ("", self.n)
        return depth == 0

    def _line_break(self) -> str:
        """After ``\\\\``: skip a star and a ``[...]`` spacing argument (an unclosed one to the end)."""
        star = _SPACE.match(self.s, self.i).end()
        if star < self.n and self.s[star] == "*":
            self.i = star + 1
        if self.i < self.n and self.s[self.i] == "[" and not self._bracket():
            self.i = self.n
        return "\n"

    # arguments -------------------------------------------------------------------------
    def _arg(self, text_mode: bool = False) -> str | None:
        """Read and render one mandatory argument: '' at a '}' or an ``\\end``, None when the
        input has ended."""
        s, i = self.s, self.i
        if i < self.n and (s[i].isspace() or s[i] == "%"):
            i = self.i = _BLANK.match(s, i).end()
        if i >= self.n:
            return None
        ch = s[i]
        if ch == "{":
            plain = _PLAIN_GROUP.match(s, i + 1)  # the common case, as _group would render it
            if plain is None or (self.math and plain.group(1).isspace()):
                self.i += 1
                return self._group()
            self.i = plain.end()
            return plain.group(1)
        if ch == "\\":
            if s.startswith("\\end", i) and self._at_end():
                return ""
            self.i += 1
            return self._macro(self._name(), bare=True)
        if ch == "}":
            return ""
        if s.startswith("\n\n", i):  # a paragraph break: blank text
            self.i += 2
            return "" if self.math else "\n\n"
        if s.startswith("$$", i) and (self.math != "$" or text_mode):  # $$ as text (in $...$, '$' ends the math)
            self.i += 2
            return "$$"
        special = _SPECIAL.match(s, i)
        if special is not None:
            self.i = special.end()
            return _SPECIALS[special.group()]
        self.i += 1
        return ch

    def _args(self, name: str, count: int, used: str) -> list[str] | None:
        """Read ``count`` arguments (after a star or ``[...]`` where ``name`` takes them); None
        when the input ends first. A failure in an argument not ``used`` does not count."""
        if name in _STARRED:
            star = _BLANK.match(self.s, self.i).end()
            if star < self.n and self.s[star] == "*":
                self.i = star + 1
        if name in _OPTIONAL and not self._bracket(name in _RENDERS_ALL):
            return None
        args, text_mode = [], name in _TEXT_ARGS
        for k in range(count):
            failures = self.failures
            arg = self._arg(text_mode)
            if arg is None:
                return None
            if self.failures != failures and "{%d}" % k not in used and name not in _RENDERS_ALL:
                self.failures = failures
            args.append(arg)
        return args

    # sequences -------------------------------------------------------------------------
    def _sequence(self, closer: str | None) -> str:
        """Render up to the end of input or the ``closer`` (not consumed; ``{env}`` stands for
        ``\\end{env}``). With no closer (in a group), a '}' also ends the sequence; otherwise a
        stray '}' renders as nothing."""
        s, n, out = self.s, self.n, []
        env = closer[1:-1] if closer and closer[0] == "{" else None
        first = "\\" if env else (closer or "}")[0]
        while self.i < n:  # the common cases first, as _node would render them
            i = self.i
            ch = s[i]
            if ch not in _PLAIN_START:
                run = _CHARS.match(s, i)
                self.i = run.end()
                text = run.group()
                out.append("" if self.math and text.isspace() else text)
            elif ch == "}":
                if closer is None:
                    break
                self.i += 1
            elif ch == first and closer and (self._at_end(env) if env else s.startswith(closer, i)):
                break
            elif ch == "\\":
                self.i += 1
                out.append(self._macro(self._name()))
            elif ch == "{":
                self.i += 1
                out.append(self._group())
            else:
                out.append(self._node())
        return "".join(out)

    def _node(self, chars: re.Pattern[str] = _CHARS) -> str:
        """Render the construct at the current position (not a '}'); ``chars``: what ordinary text is."""
        s, i = self.s, self.i
        ch = s[i]
        if ch == "\\":
            self.i += 1
            return self._macro(self._name())
        if ch == "{":
            self.i += 1
            return self._group()
        if ch == "$":
            closer = "$$" if s.startswith("$$", i) else "$"
            self.i += len(closer)
            return self._math(closer)
        if ch == "%":
            self.i = _COMMENT.match(s, i).end()
            return ""
        special = _SPECIAL.match(s, i)
        if special is not None:
            self.i = special.end()
            return _SPECIALS[special.group()]
        run = chars.match(s, i)
        self.i = run.end()
        text = run.group()
        return "" if self.math and text.isspace() else text

    def _group(self) -> str:
        """Render a group after its '{', up to its '}' (or the end of input)."""
        plain = _PLAIN_GROUP.match(self.s, self.i)
        if plain is not None:
            self.i, text = plain.end(), plain.group(1)
            return "" if self.math and text.isspace() else text
        key = ("{", self.i, self.math)
        if self.unclosed and key in self.unclosed:
            text, self.i = self.unclosed[key]
            return text
        text = self._sequence(None)
        if self.i < self.n:
            self.i += 1
        else:
            self.unclosed = self.unclosed or {}
            self.unclosed[key] = (text, self.i)
        return text

    def _math(self, closer: str) -> str:
        """Render math after its opening delimiter, up to ``closer``."""
        saved, self.math = self.math, closer
        text = self._sequence(closer).strip()
        self.math = saved
        self.i = min(self.i + len(closer), self.n)
        return _display(text) if closer in ("$$", "\\]") else text

    # macros ----------------------------------------------------------------------------
    def _macro(self, name: str, bare: bool = False) -> str:
        """Render the macro ``name`` (read up to its name) with its arguments; ``bare``: as
        another macro's argument, without arguments of its own."""
        s, after_name, space = self.s, self.i, ""
        if after_name < self.n and s[after_name].isspace() and name.isalpha():
            self.i = _SPACE.match(s, after_name).end()  # the space after a macro name is read with it;
            if self.math and not bare and _CHARS.match(s, self.i):  # in math, it stays before ordinary text
                space = s[after_name : self.i]
        symbol = _SYMBOLS.get(name)
        if symbol is not None:
            return symbol + space
        form = _FORMATS.get(name)
        if form is not None:
            count, text, without = form
            args_start = self.i
            args = None if bare else self._args(name, count, text)
            if args is not None:
                return text.format(*args)
            self.i = args_start  # what was read renders on its own
            if without is None:
                self.failures += 1
            return without or ""
        if name in _ACCENTS:
            arg = None if bare else self._arg()
            return " " + _ACCENTS[name] if arg is None else _accented(arg.strip(), _ACCENTS[name])
        if name in _ALPHABETS:
            arg = None if bare else self._arg()
            return "".join(_styled(_ALPHABETS[name], c) for c in (arg or ""))
        if name == "\\":
            return "\n" if bare else self._line_break()
        if name in _MATH_OPEN:
            return "" if bare else self._math(_MATH_OPEN[name])
        if name == "begin" or name == "end":
            if not bare:
                self.i = after_name  # a \begin or \end that is text keeps the space after it
            return self._begin_end(name, bare)
        return space  # unknown macros vanish

    # environments ----------------------------------------------------------------------
    def _begin_end(self, name: str, bare: bool) -> str:
        """``\\begin{env}...\\end{env}``; a stray ``\\end{env}`` renders as nothing, and a
        ``\\begin`` or ``\\end`` without a name as itself."""
        if bare and name == "begin":
            return ""
        match = _ENV_NAME.match(self.s, self.i)
        if match is None:  # ordinary text, with the white space that follows it
            if bare:
                return ""
            start, self.i = self.i, _WHITE.match(self.s, self.i).end()
            return "\\" + name + self.s[start : self.i]
        self.i = match.end()
        return "" if name == "end" else self._environment(match.group(1))

    def _end_environment(self, name: str) -> None:
        """Read the ``\\end{name}`` that closes the environment, if it is there."""
        if self._at_end(name):
            self.i = _ENV_NAME.match(self.s, self.i + 4).end()

    def _environment(self, name: str) -> str:
        """Render an environment after its ``\\begin{name}``, up to its ``\\end{name}``."""
        if name in _ENV_ARGS:
            save = self.i
            if self._args(name, _ENV_ARGS[name], "") is None:
                self.i = save  # arguments missing: the content starts right after the name
        if name in _MATRIX_ENVS:
            return self._matrix(name)
        saved, self.math = self.math, self.math or (name if name in _MATH_ENVS else "")
        body = self._sequence("{" + name + "}")
        self.math = saved
        self._end_environment(name)
        if name in _MATH_ENVS:
            return _display(body)
        return f"\n{body}\n" if name in _BLOCK_ENVS else body

    def _matrix(self, name: str) -> str:
        """Rows split at ``\\\\``, cells at '&'; a cell with nothing in it is left out."""
        s, rows, cell = self.s, [[]], None
        while self.i < self.n:
            i = self.i
            ch = s[i]
            if ch == "&" or s.startswith("\\\\", i):
                if cell is not None:
                    rows[-1].append("".join(cell).strip())
                cell = None
                self.i += 1
                if ch == "\\":
                    self.i += 1
                    self._line_break()
                    rows.append([])
                continue
            if ch == "}":
                self.i += 1
                continue
            if ch == "\\":
                if self._at_end(name):
                    break
                if s.startswith(("\\)", "\\]"), i) or (self._at_end() and _ENV_NAME.match(s, i + 4)):
                    self._node()  # a stray closing math or environment: nothing, not even a cell
                    continue
            if cell is None:
                cell = []
            cell.append(self._node())
        if cell is not None:
            rows[-1].append("".join(cell).strip())
        self._end_environment(name)
        cells = [c for row in rows for c in row]
        if not cells:
            self.failures += 1
            return ""
        width = max(map(len, cells))
        return "[ " + "; ".join(" ".join(c.rjust(width) for c in row) for row in rows) + " ]"


def latex_to_text(latex: str) -> str:
    """Render ``latex`` as plain text (see the module docstring for the rules).

    Raises ``LatexRenderError`` (or ``RecursionError`` for absurd nesting) where the
    reference renderer fails; callers then keep the unrendered string.
    """
    if "\\" not in latex and _CHARS.fullmatch(latex):
        return latex  # plain text renders as itself
    if latex.endswith("\\") and (len(latex) - len(latex.rstrip("\\"))) % 2:
        # A lone backslash at the very end reads as the end of input, with the white space
        # before it (back to a blank line).
        body = latex[:-1].rstrip()
        blank = latex.rfind("\n\n", len(body))
        latex = latex[: blank + 2] if blank >= 0 else body
    renderer = _Renderer(latex)
    text = renderer._sequence("")
    if renderer.failures:
        raise LatexRenderError("input the reference renderer fails on")
    return text
