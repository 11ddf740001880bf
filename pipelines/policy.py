"""Prompt policy: blocked terms and regex patterns, checked before anything renders.

Policy file (YAML; unknown keys are errors that name them; an empty file is an empty policy):

    terms:                  # words or phrases; case-insensitive, whole words only
      - badword
      - blood bath          # multi-word: matches across any run of spaces, '-' or '_'
    patterns:               # Python regexes, searched in the *normalized* prompt
      - 'kill(ing)? (all|every)\\w*'

Rule names (what `check` returns and the renderer records): ``term:<term as written>`` and
``pattern:<pattern as written>``; terms are tried first, each list in file order.

Normalization (`normalize`, applied to every prompt before any rule runs):

* Unicode NFKC: full-width ``ｂａｄ``, mathematical ``𝐛𝐚𝐝``, circled ``ⓑⓐⓓ`` and ligatures become ASCII;
* format characters removed (category Cf: zero-width space/joiners U+200B..U+200D, word joiner U+2060,
  BOM U+FEFF, soft hyphen U+00AD, bidi controls), so ``b\\u200bad`` is ``bad``;
* accents stripped from Latin/Greek/Cyrillic letters (NFKD, combining marks dropped after those
  letters only, then NFC so other scripts such as Devanagari or Hangul keep their marks), plus the
  stroke letters that do not decompose (``ø ł đ ħ ŧ ƀ ı``): ``bád``, ``b̸ad`` -> ``bad``;
* casefold (``BaD`` -> ``bad``, ``ß`` -> ``ss``) and whitespace collapsed to single spaces.

Terms match on word boundaries (a letter or digit may not touch either end, so ``gore`` does not
match ``gorgeous`` or ``gore2``, but does match ``#gore`` and ``gore_fest``) in two further forms:

* look-alike letters from other scripts folded to Latin (Cyrillic ``а е о р с х у і ј ѕ ԁ һ к ԛ ԝ``,
  Greek ``α ο ρ ν ι κ υ χ``; see `_CONFUSABLES`): ``bаd`` with a Cyrillic ``а`` is ``bad``. Only
  terms see this fold (patterns see `normalize`'s output), so a whole-Cyrillic word that looks
  exactly like a Latin term (``сор`` vs ``cop``) also matches, as it would to a reader;
* separator obfuscation: the term's letters with the *same* run of 1-3 separators (space or
  punctuation) between every pair: ``b.a.d``, ``b a d``, ``b-a-d``, ``b_a_d``, ``b . a . d``,
  ``b...a...d``; for multi-word terms the gap between words may be any separator run.

Not caught (by design or by limits of a word list): mixed separators (``b.a d``), separators between
only some letters (``ba.d``; this keeps ``go re-enter`` from matching ``gore``), letters inside the
word (``bXaXd``), leetspeak or digits (``b4d``), repeated letters (``baaad``), misspellings,
reversed text and right-to-left overrides (the control is removed; the reversed order stays),
look-alikes missing from the small table, words split across the prompt and negative prompt,
and meaning (paraphrase, other languages). Single-character terms get no separator form.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["PolicyError", "PromptPolicy", "normalize", "fold_confusables"]

_KEYS = ("terms", "patterns")

_STROKES = str.maketrans({"ø": "o", "ł": "l", "đ": "d", "ħ": "h", "ŧ": "t", "ƀ": "b", "ı": "i"})
"""Latin letters with a stroke that NFKD leaves whole (checked after casefold, so lower case only)."""

_CONFUSABLES = str.maketrans(
    {
        # Cyrillic (lower case: text is casefolded first)
        "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "х": "x", "у": "y", "і": "i",
        "ј": "j", "ѕ": "s", "ԁ": "d", "һ": "h", "к": "k", "ԛ": "q", "ԝ": "w", "ӏ": "l",
        # Greek
        "α": "a", "ο": "o", "ρ": "p", "ν": "v", "ι": "i", "κ": "k", "υ": "u", "χ": "x", "ϲ": "c", "ϳ": "j",
        # Latin letter variants
        "ɑ": "a", "ɡ": "g", "ɩ": "i",
    }
)  # fmt: skip
"""One character to one character, so word boundaries and match positions are unchanged."""

_SEPARATOR = r"[\W_]"
"""A separator character in an obfuscated term: anything but a letter or digit."""

_NOT_ALNUM_BEFORE = r"(?<![^\W_])"
_NOT_ALNUM_AFTER = r"(?![^\W_])"


class PolicyError(ValueError):
    """The policy file or a rule in it is malformed; the message says which."""


def _strips_marks(base: str) -> bool:
    """Whether combining marks after this character are accents on a Latin/Greek/Cyrillic letter."""
    if not base.isalpha():
        return False
    name = unicodedata.name(base, "")
    return name.startswith(("LATIN", "GREEK", "CYRILLIC"))


def normalize(text: str) -> str:
    """The form every rule is matched against: NFKC, no format characters, no accents, casefolded, single spaces."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    out: list[str] = []
    base = ""
    for c in unicodedata.normalize("NFKD", text):
        if unicodedata.combining(c):
            if _strips_marks(base):
                continue
        else:
            base = c
        out.append(c)
    text = unicodedata.normalize("NFC", "".join(out)).casefold().translate(_STROKES)
    return " ".join(text.split())


def fold_confusables(normalized: str) -> str:
    """`normalize`d text with look-alike letters of other scripts mapped to Latin (one char to one)."""
    return normalized.translate(_CONFUSABLES)


def _term_regex(term: str) -> str:
    """Whole-word regex for a (normalized, folded) term: the plain form, or every letter separated alike."""
    words = term.split()
    plain = r"[\s\-_]+".join(re.escape(w) for w in words)
    forms = [plain]
    chars = [[c for c in w if c.isalnum()] for w in words]
    if sum(len(w) for w in chars) > 1 and all(chars):
        sep = r"(?P<sep>[\W_]{1,3})"
        pieces = []
        first = True
        for i, word in enumerate(chars):
            if i:
                pieces.append(r"[\W_]+")
            for j, c in enumerate(word):
                if j:
                    if first:
                        pieces.append(sep)
                        first = False
                    else:
                        pieces.append("(?P=sep)")
                pieces.append(re.escape(c))
        if not first:  # at least one in-word gap carries the separator
            forms.append("".join(pieces))
    return _NOT_ALNUM_BEFORE + "(?:" + "|".join(forms) + ")" + _NOT_ALNUM_AFTER


def _strings(value: Any, key: str, source: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise PolicyError(f"{source}: '{key}' must be a list of strings, got {type(value).__name__}")
    items = list(value)
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise PolicyError(f"{source}: '{key}' entries must be non-empty strings, got {item!r}")
    return items


@dataclass(frozen=True)
class PromptPolicy:
    """Named rules over normalized text; `check` returns the first rule a text breaks.

    Rules named ``term:...`` are matched against ``fold_confusables(normalize(text))``,
    rules named ``pattern:...`` against ``normalize(text)``.
    """

    rules: tuple[tuple[str, re.Pattern], ...] = ()

    @classmethod
    def from_lists(cls, terms: Iterable[str] = (), patterns: Iterable[str] = (), *, source: str = "policy") -> PromptPolicy:
        """Compiles terms (word-boundary, obfuscation-aware) and regex patterns; errors name the bad entry."""
        rules: list[tuple[str, re.Pattern]] = []
        for term in _strings(terms, "terms", source):
            folded = fold_confusables(normalize(term))
            if not folded:
                raise PolicyError(f"{source}: term {term!r} is empty after normalization")
            rules.append((f"term:{term}", re.compile(_term_regex(folded))))
        for pattern in _strings(patterns, "patterns", source):
            try:
                compiled = re.compile(pattern, re.IGNORECASE)
            except re.error as e:
                raise PolicyError(f"{source}: pattern {pattern!r} is not a valid regex: {e}") from e
            rules.append((f"pattern:{pattern}", compiled))
        return cls(tuple(rules))

    @classmethod
    def load(cls, path: str | Path) -> PromptPolicy:
        """Reads a YAML policy file ({terms: [...], patterns: [...]})."""
        path = Path(path).expanduser()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise PolicyError(f"policy file not found: {path}") from e
        except yaml.YAMLError as e:
            raise PolicyError(f"policy file {path} is not valid YAML: {e}") from e
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PolicyError(f"policy file {path} must be a mapping with keys {list(_KEYS)}, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in _KEYS)
        if unknown:
            raise PolicyError(f"policy file {path}: unknown key(s) {unknown}; allowed: {list(_KEYS)}")
        return cls.from_lists(data.get("terms"), data.get("patterns"), source=f"policy file {path}")

    def check(self, *texts: str | None) -> str | None:
        """The name of the first rule any of the texts breaks, or None; None texts are skipped."""
        views = []
        for text in texts:
            if text:
                normalized = normalize(text)
                views.append((normalized, fold_confusables(normalized)))
        if not views:
            return None
        for name, pattern in self.rules:
            use_folded = name.startswith("term:")
            for normalized, folded in views:
                if pattern.search(folded if use_folded else normalized):
                    return name
        return None
