"""Render LaTeX math answers as plain text, the way the reference grader sees them.

The reference grader turns a LaTeX answer into plain text before handing it to sympy,
using the ``pylatexenc`` package. We do not want that package as a dependency, so this
module reimplements the part of its behaviour that matters for grading math answers:

* ``\\frac{a}{b}`` becomes ``a/b`` (no parentheses are added, so ``\\frac{a+b}{c}``
  reads as ``a+b/c``), ``\\sqrt[n]{x}`` becomes ``√(x)`` (the index is dropped);
* symbol macros become Unicode characters (``\\pi`` -> ``π``, ``\\le`` -> ``≤``);
  function names stay words (``\\sin`` -> ``sin``);
* unknown macros vanish while the groups that follow them are kept
  (``\\binom{5}{2}`` -> ``52``, ``\\ne`` -> nothing);
* a few macros drop their argument (``\\mbox{cm}`` -> nothing);
* ``\\mathbb{R}``-style alphabets map letters to mathematical Unicode letters,
  accents combine with the accented characters;
* matrices render as ``[ a b; c d ]``, other environments as their cells separated by
  spaces and rows separated by newlines; ``\\\\`` is a newline.

Only the presence of whitespace matters downstream (runs of spaces are later removed),
so spacing macros need not reproduce exact widths. ``latex_to_text`` raises
``LatexRenderError`` where the reference's renderer raises, so callers can keep the
original string exactly as the reference does.
"""

from __future__ import annotations

import unicodedata

__all__ = [
    "LatexRenderError",
    "latex_to_text",
]


class LatexRenderError(ValueError):
    """Raised for input the reference renderer also fails on (e.g. ``\\sqrt`` with no argument)."""


# --- macro tables -----------------------------------------------------------------------

_GREEK = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ϵ", "varepsilon": "ε",
    "zeta": "ζ", "eta": "η", "theta": "θ", "vartheta": "ϑ", "iota": "ι", "kappa": "κ",
    "lambda": "λ", "mu": "μ", "nu": "ν", "xi": "ξ", "pi": "π", "varpi": "ϖ", "rho": "ρ",
    "varrho": "ϱ", "sigma": "σ", "varsigma": "ς", "tau": "τ", "upsilon": "υ", "phi": "ϕ",
    "varphi": "φ", "chi": "χ", "psi": "ψ", "omega": "ω",
    "Gamma": "Γ", "Delta": "Δ", "Theta": "Θ", "Lambda": "Λ", "Xi": "Ξ", "Pi": "Π",
    "Sigma": "Σ", "Upsilon": "Υ", "Phi": "Φ", "Psi": "Ψ", "Omega": "Ω",
}

# Symbol macros and what they render as. Macros absent from every table are unknown and
# render as nothing (e.g. \ne, \gcd, \triangle, \implies, \iff are unknown to the reference).
_SYMBOLS = {
    **_GREEK,
    # relations
    "le": "≤", "leq": "≤", "ge": "≥", "geq": "≥", "neq": "≠", "leqslant": "⩽", "geqslant": "⩾",
    "ll": "≪", "gg": "≫", "approx": "≈", "sim": "∼", "simeq": "≃", "cong": "≅", "equiv": "≡",
    "propto": "∝", "perp": "⊥", "parallel": "∥", "nparallel": "∦", "mid": "|", "nmid": "∤",
    "in": "∈", "notin": "∉", "ni": "∋", "subset": "⊂", "subseteq": "⊆", "supset": "⊃",
    "supseteq": "⊇", "vdash": "⊢", "top": "⊤",
    # operators
    "pm": "±", "mp": "∓", "times": "×", "div": "÷", "cdot": "·", "ast": "∗", "star": "⋆",
    "circ": "∘", "bullet": "∙", "oplus": "⊕", "otimes": "⊗", "circledast": "⊛", "cup": "∪",
    "cap": "∩", "bigcup": "⋃", "bigcap": "⋂", "setminus": "∖", "wedge": "∧", "vee": "∨",
    "lnot": "¬", "sum": "∑", "prod": "∏", "coprod": "∐", "int": "∫", "partial": "∂",
    "nabla": "∇", "dagger": "†", "dag": "†", "odot": "⊙", "ominus": "⊖",
    # arrows
    "to": "→", "rightarrow": "→", "leftarrow": "←", "Rightarrow": "⇒", "Leftarrow": "⇐",
    "leftrightarrow": "↔", "Leftrightarrow": "⇔", "mapsto": "↦", "longrightarrow": "⟶",
    "uparrow": "↑", "downarrow": "↓", "Longrightarrow": "⟹", "Longleftarrow": "⟸",
    "Longleftrightarrow": "⟺", "longleftarrow": "⟵", "longleftrightarrow": "⟷",
    # misc symbols
    "infty": "∞", "emptyset": "∅", "varnothing": "∅", "forall": "∀", "exists": "∃",
    "angle": "∠", "measuredangle": "∡", "bigtriangleup": "△", "square": "□",
    "blacksquare": "▪", "diamond": "♢", "therefore": "∴", "because": "∵", "prime": "'",
    "ell": "ℓ", "hbar": "ħ", "aleph": "ℵ", "wp": "℘", "textdegree": "°", "textcelsius": "℃",
    "textregistered": "®",
    # dots
    "ldots": "…", "dots": "…", "dotsm": "…", "dotsc": "…", "dotsb": "…", "dotsi": "…",
    "dotso": "…", "cdots": "⋯", "vdots": "⋮", "ddots": "⋱",
    # delimiters
    "lfloor": "⌊", "rfloor": "⌋", "lceil": "⌈", "rceil": "⌉", "langle": "⟨", "rangle": "⟩",
    "lbrace": "{", "rbrace": "}", "lvert": "|", "rvert": "|", "vert": "|", "Vert": "‖",
    "lVert": "‖", "rVert": "‖", "backslash": "\\", "textbackslash": "\\",
    # letters
    "ss": "ß", "O": "Ø", "o": "ø", "i": "ı", "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ",
    "aa": "å", "AA": "Å", "l": "ł", "L": "Ł",
    # function names keep their spelling
    **{name: name for name in (
        "sin", "cos", "tan", "sinh", "cosh", "tanh", "arcsin", "arccos", "arctan",
        "log", "ln", "exp", "lim", "max", "min", "inf", "sup")},
    "liminf": "lim inf", "limsup": "lim sup",
    # spacing
    "quad": "  ", "qquad": "    ",
}

# One-character macros (a backslash followed by a non-letter).
_CHAR_MACROS = {
    ",": " ", ";": " ", ":": " ", " ": " ", "!": "", "{": "{", "}": "}", "$": "$", "%": "%",
    "&": "&", "#": "#", "_": "_", "|": "", "\\": "\n", "(": "", ")": "", "[": "", "]": "",
}

# Macros whose single argument is discarded (rendered as the given text).
_DISCARD_ARG = {
    "mbox": "", "textsf": "", "texttt": "", "textup": "", "hphantom": "", "vphantom": "",
    "label": "", "hspace": "", "vspace": "\n", "color": "", "textcolor": "",
}

# Combining marks for accent macros (math and text accents); the accent applies to each
# character of its argument and is composed where Unicode has a precomposed character.
_ACCENTS = {
    "hat": "\u0302", "bar": "\u0305", "vec": "\u20d7", "dot": "\u0307", "ddot": "\u0308",
    "tilde": "\u0303", "check": "\u030c", "breve": "\u0306", "acute": "\u0301",
    "grave": "\u0300",
    "'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303", "=": "\u0304",
    ".": "\u0307", "c": "\u0327", "v": "\u030c", "u": "\u0306", "H": "\u030b", "r": "\u030a",
    "b": "\u0331", "d": "\u0323", "k": "\u0328",
}

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

# \not followed by a symbol gives its negated form.
_NEGATED = {"=": "≠", "≡": "≢", "∈": "∉", "<": "≮", ">": "≯", "≤": "≰", "≥": "≱", "⊂": "⊄",
            "⊆": "⊈", "∼": "≁", "≈": "≉", "≅": "≇"}

# Environments rendered as a bracketed matrix "[ a b; c d ]".
_BRACKET_ENVS = {"pmatrix", "bmatrix", "array", "smallmatrix"}
# Environments whose first argument is a column specification to skip.
_COLSPEC_ENVS = {"array", "tabular"}
# Display environments surrounded by newlines.
_DISPLAY_ENVS = {"equation", "equation*", "align", "align*", "center", "gather", "gather*",
                 "multline", "multline*", "eqnarray", "eqnarray*", "displaymath"}


def _styled(style: str, ch: str) -> str:
    if not ("a" <= ch <= "z" or "A" <= ch <= "Z"):
        return ch
    special = _LETTERLIKE.get((style, ch))
    if special is not None:
        return special
    case = "CAPITAL" if ch.isupper() else "SMALL"
    try:
        return unicodedata.lookup(f"MATHEMATICAL {style} {case} {ch.upper()}")
    except KeyError:  # pragma: no cover - every style above covers all Latin letters
        return ch


def _accented(text: str, mark: str) -> str:
    if not text:
        return ""
    return "".join(unicodedata.normalize("NFC", ch + mark) for ch in text)


# --- renderer ---------------------------------------------------------------------------


class _Renderer:
    """A small recursive-descent LaTeX reader that renders while it parses."""

    def __init__(self, source: str) -> None:
        self.s = source
        self.n = len(source)
        self.i = 0

    # low-level scanning ----------------------------------------------------------------
    def _skip_space(self) -> None:
        while self.i < self.n and self.s[self.i] in " \t\n\r":
            self.i += 1

    def _read_macro_name(self) -> str:
        """Read the name after a backslash at ``self.i - 1``; '' at end of input."""
        s, start = self.s, self.i
        if start >= self.n:
            return ""
        if s[start].isascii() and s[start].isalpha():
            j = start
            while j < self.n and s[j].isascii() and s[j].isalpha():
                j += 1
            if j < self.n and s[j] == "*" and s[start:j] in ("hspace", "vspace"):
                j += 1
            self.i = j
            self._skip_space()
            return s[start:j].rstrip("*") if s[start:j].endswith("*") else s[start:j]
        self.i = start + 1
        return s[start]

    def _read_bracket(self) -> None:
        """Skip an optional ``[...]`` argument if one follows."""
        save = self.i
        self._skip_space()
        if self.i < self.n and self.s[self.i] == "[":
            depth = 0
            while self.i < self.n:
                ch = self.s[self.i]
                self.i += 1
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                elif ch == "]" and depth <= 0:
                    return
            return
        self.i = save

    def _read_arg(self) -> str | None:
        """Read and render one mandatory argument; None when the input has ended."""
        self._skip_space()
        if self.i >= self.n:
            return None
        ch = self.s[self.i]
        if ch == "{":
            self.i += 1
            return self._render_until_close()
        if ch == "\\":
            # A macro used as an argument is taken bare, without arguments of its own.
            self.i += 1
            name = self._read_macro_name()
            return self._render_macro(name, bare=True)
        if ch == "}":
            return None
        self.i += 1
        return ch

    def _render_until_close(self) -> str:
        """Render up to the matching ``}`` (or the end of input) and consume it."""
        out = self._render_sequence()
        if self.i < self.n and self.s[self.i] == "}":
            self.i += 1
        return out

    # sequences -------------------------------------------------------------------------
    def render_all(self) -> str:
        parts = []
        while self.i < self.n:
            parts.append(self._render_sequence())
            if self.i < self.n and self.s[self.i] == "}":
                self.i += 1  # a stray closing brace renders as nothing
        return "".join(parts)

    def _render_sequence(self) -> str:
        s, out = self.s, []
        while self.i < self.n:
            ch = s[self.i]
            if ch == "}":
                break
            if ch == "{":
                self.i += 1
                out.append(self._render_until_close())
            elif ch == "\\":
                self.i += 1
                name = self._read_macro_name()
                if name == "begin":
                    out.append(self._render_environment())
                elif name == "end":
                    self._read_env_name()  # a stray \end{...} renders as nothing
                else:
                    out.append(self._render_macro(name))
            elif ch == "~":
                self.i += 1
                out.append("\xa0")
            elif ch == "-" and s.startswith("--", self.i):
                if s.startswith("---", self.i):
                    self.i += 3
                    out.append("—")
                else:
                    self.i += 2
                    out.append("–")
            elif ch == "`" and s.startswith("``", self.i):
                self.i += 2
                out.append("“")
            elif ch == "'" and s.startswith("''", self.i):
                self.i += 2
                out.append("”")
            elif ch in "!?" and s.startswith("`", self.i + 1):
                self.i += 2
                out.append("¡" if ch == "!" else "¿")
            elif ch == "&":
                self.i += 1
                out.append("   ")
            elif ch == "$":
                self.i += 1  # math shifts vanish; their content renders as text
            else:
                self.i += 1
                out.append(ch)
        return "".join(out)

    # macros ----------------------------------------------------------------------------
    def _render_macro(self, name: str, bare: bool = False) -> str:
        if name == "":
            return ""
        if name == "frac":
            if bare:
                return "%s/%s"
            num = self._read_arg()
            den = self._read_arg() if num is not None else None
            if num is None or den is None:
                return "%s/%s" + (num or "")
            return f"{num}/{den}"
        if name == "sqrt":
            if bare:
                raise LatexRenderError("\\sqrt without an argument")
            self._read_bracket()
            arg = self._read_arg()
            if arg is None:
                raise LatexRenderError("\\sqrt without an argument")
            return f"√({arg})"
        if name == "\\":
            if not bare:
                self._read_bracket()
            return "\n"
        if len(name) == 1 and name in _CHAR_MACROS and name not in _ACCENTS:
            return _CHAR_MACROS[name]
        if name in _SYMBOLS:
            return _SYMBOLS[name]
        if name in _ACCENTS:
            arg = None if bare else self._read_arg()
            if arg is None:
                return " " + _ACCENTS[name]
            return _accented(arg, _ACCENTS[name])
        if name in _ALPHABETS:
            arg = None if bare else self._read_arg()
            return "".join(_styled(_ALPHABETS[name], c) for c in (arg or ""))
        if name in _DISCARD_ARG:
            if not bare:
                self._read_arg()
            return _DISCARD_ARG[name]
        if name == "not":
            nxt = "" if bare else (self._read_arg() or "")
            if nxt[:1] in _NEGATED:
                return _NEGATED[nxt[:1]] + nxt[1:]
            return nxt[:1] + "\u0338" + nxt[1:] if nxt else ""
        if name in ("ref", "cite"):
            if not bare:
                self._read_arg()
            return "<ref>" if name == "ref" else "<cit.>"
        return ""  # unknown macros vanish; a following group renders on its own

    # environments ----------------------------------------------------------------------
    def _read_env_name(self) -> str:
        self._skip_space()
        if self.i < self.n and self.s[self.i] == "{":
            end = self.s.find("}", self.i)
            if end < 0:
                end = self.n
            name = self.s[self.i + 1 : end].strip()
            self.i = min(end + 1, self.n)
            return name
        return ""

    def _render_environment(self) -> str:
        name = self._read_env_name()
        if name in _COLSPEC_ENVS:
            if self._read_arg() is None:
                raise LatexRenderError(f"environment {name} without content")
        rows: list[list[str]] = [[]]
        cell: list[str] = []
        while True:
            piece = self._render_cell_piece()
            cell.append(piece)
            if self.i >= self.n:
                break
            if self.s.startswith("\\end", self.i):
                self.i += len("\\end")
                self._read_env_name()
                break
            # _render_cell_piece stopped at '&' or '\\'
            if self.s[self.i] == "&":
                self.i += 1
                rows[-1].append("".join(cell))
                cell = []
            else:
                self.i += 2
                self._read_bracket()
                rows[-1].append("".join(cell))
                cell = []
                rows.append([])
        rows[-1].append("".join(cell))
        if name in _BRACKET_ENVS:
            if len(rows) == 1 and not "".join(rows[0]).strip():
                raise LatexRenderError(f"empty environment {name}")
            body = "; ".join(" ".join(c.strip() for c in row) for row in rows)
            return f"[ {body} ]"
        body = "\n".join("   ".join(row) for row in rows)
        if name in _DISPLAY_ENVS:
            return f"\n{body}\n"
        return body

    def _render_cell_piece(self) -> str:
        """Render inside an environment until '&', '\\\\', '\\end' or end of input."""
        s, out = self.s, []
        while self.i < self.n:
            ch = s[self.i]
            if ch == "&":
                break
            if ch == "\\" and (s.startswith("\\\\", self.i) or s.startswith("\\end", self.i)):
                break
            if ch == "}":
                self.i += 1  # a stray closing brace renders as nothing
                continue
            start = self.i
            # Render one element with the ordinary sequence renderer.
            if ch == "{":
                self.i += 1
                out.append(self._render_until_close())
            elif ch == "\\":
                self.i += 1
                name = self._read_macro_name()
                if name == "begin":
                    out.append(self._render_environment())
                else:
                    out.append(self._render_macro(name))
            else:
                self.i = start
                out.append(self._render_plain_run())
        return "".join(out)

    def _render_plain_run(self) -> str:
        """Render characters up to the next structural character inside an environment."""
        s, start = self.s, self.i
        j = start
        while j < self.n and s[j] not in "&\\{}":
            j += 1
        sub = _Renderer(s[start:j])
        self.i = j
        return sub._render_sequence()


def latex_to_text(latex: str) -> str:
    """Render ``latex`` as plain text (see the module docstring for the rules).

    Raises ``LatexRenderError`` (or ``RecursionError`` for absurd nesting) where the
    reference renderer fails; callers then keep the unrendered string.
    """
    return _Renderer(latex).render_all()
