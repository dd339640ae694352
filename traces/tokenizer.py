"""Tokens without a model: the built-in deterministic tokenizer, and HF ``tokenizer.json`` files.

Everything that speaks to a server counts tokens: the replay client builds
prompts of a trace's length, the emulated backend counts what it is sent
and produces output text, the router measures prompts for its policy. They
share one :class:`Tokenizer` interface, so the three agree on every count.

The built-in tokenizer (:class:`WordTokenizer`) needs no files: **one token
per whitespace-separated word**. A vocabulary of :data:`VOCAB_SIZE`
pronounceable words (``"bako"``, ``"tesu"``, ...) gives token ids both
ways; any other word still counts as one token, with an id hashed from it
(CRC-32, stable across runs and machines). So:

* ``len(tok.encode(text)) == len(text.split())`` for every text;
* ``tok.decode(ids)`` joins the ids' words with spaces, and encoding that
  text gives ``ids`` back (ids of the vocabulary; a hashed id decodes to a
  vocabulary word, keeping the count);
* :meth:`Tokenizer.text_of_length` builds a text of exactly ``n`` tokens,
  deterministic for a seed, with distinct seeds giving distinct texts (so
  two prompts share a prefix only when meant to).

A real model's counts differ (subwords, merges); where that matters, give
the HF ``tokenizer.json`` of the served model (:class:`HFTokenizer`, on the
``tokenizers`` package), and every component counts as the server does.
Chat messages are rendered as ``role: content`` lines (:func:`render_chat`)
unless a model's template is used.
"""

from __future__ import annotations

import random
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from traces.errors import ConfigError

__all__ = [
    "VOCAB_SIZE",
    "HFTokenizer",
    "Tokenizer",
    "WordTokenizer",
    "load_tokenizer",
    "open_hf_tokenizer",
    "render_chat",
]

#: Words of the built-in vocabulary; ids at or above it are hashed words.
VOCAB_SIZE = 4096
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


class Tokenizer(ABC):
    """Text to token ids and back, and texts of a given length."""

    #: What the tokenizer is, for run metadata (``builtin`` or a file path).
    name: str = ""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    def count(self, text: str) -> int:
        """Tokens in ``text``."""
        return len(self.encode(text))

    def text_of_length(self, n: int, seed: int = 0) -> str:
        """A text of exactly ``n`` tokens, the same for the same seed.

        Raises:
            ValueError: ``n`` below 0.
        """
        return self.decode(self.ids_of_length(n, seed))

    def ids_of_length(self, n: int, seed: int = 0) -> list[int]:
        """``n`` token ids drawn from the vocabulary, the same for the same seed.

        Raises:
            ValueError: ``n`` below 0.
        """
        if n < 0:
            raise ValueError(f"token count must be >= 0; got {n}")
        rng = random.Random(seed)
        return [rng.randrange(VOCAB_SIZE) for _ in range(n)]


@cache
def _vocabulary() -> tuple[str, ...]:
    """The built-in words: two consonant-vowel syllables each (14 * 5 squared = 4900, cut)."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    words = [a + b for a in syllables for b in syllables]
    return tuple(words[:VOCAB_SIZE])


@cache
def _ids() -> dict[str, int]:
    return {w: i for i, w in enumerate(_vocabulary())}


class WordTokenizer(Tokenizer):
    """The built-in tokenizer: one token per whitespace-separated word (see the module doc)."""

    name = "builtin"

    def encode(self, text: str) -> list[int]:
        ids, words = _ids(), text.split()
        return [ids[w] if w in ids else _hashed(w) for w in words]

    def count(self, text: str) -> int:
        return len(text.split())

    def decode(self, ids: Sequence[int]) -> str:
        vocab = _vocabulary()
        return " ".join(vocab[i % VOCAB_SIZE] for i in ids)


def _hashed(word: str) -> int:
    """A stable id above the vocabulary for a word outside it."""
    return VOCAB_SIZE + zlib.crc32(word.encode("utf-8"))


def open_hf_tokenizer(path: str | Path) -> tuple[Any, Path]:
    """The ``tokenizers.Tokenizer`` of a ``tokenizer.json`` (or the folder holding one), and its file.

    Raises:
        ConfigError: the file is missing or not a tokenizer.
    """
    try:
        from tokenizers import Tokenizer as _HF
    except ImportError:  # pragma: no cover - a dependency of llmsched
        raise ConfigError("--tokenizer: the 'tokenizers' package is not installed") from None
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ConfigError(f"--tokenizer: {p}: no such file (a tokenizer.json or its folder)")
    try:
        return _HF.from_file(str(p)), p
    except Exception as exc:  # the library raises plain Exceptions
        raise ConfigError(f"--tokenizer: {p}: not a tokenizer.json ({exc})") from None


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (the ``tokenizers`` package): the served model's counts.

    Raises:
        ConfigError: the file is missing or not a tokenizer.
    """

    def __init__(self, path: str | Path) -> None:
        self._tok, p = open_hf_tokenizer(path)
        self.name = str(p)
        self._vocab = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def ids_of_length(self, n: int, seed: int = 0) -> list[int]:
        if n < 0:
            raise ValueError(f"token count must be >= 0; got {n}")
        rng = random.Random(seed)
        # Ids that decode and re-encode to themselves, so the text has n tokens.
        out: list[int] = []
        while len(out) < n:
            i = rng.randrange(self._vocab)
            if self.encode(self.decode([i])) == [i]:
                out.append(i)
        return out

    def text_of_length(self, n: int, seed: int = 0) -> str:
        """A text of ``n`` tokens: single-token pieces joined, trimmed until the count is exact."""
        ids = self.ids_of_length(n, seed)
        text = self.decode(ids)
        # Merges across piece boundaries can change the count; top up or cut.
        extra = 0
        while self.count(text) < n:
            extra += 1
            text = self.decode(ids + self.ids_of_length(extra, seed + 1))
        while self.count(text) > n and ids:
            ids = ids[:-1]
            text = self.decode(ids)
        return text


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """The HF tokenizer at ``path``, or the built-in one when ``path`` is None.

    Raises:
        ConfigError: ``path`` is not a tokenizer.
    """
    return WordTokenizer() if path is None else HFTokenizer(path)


def render_chat(messages: Sequence[Mapping[str, object]]) -> str:
    """Chat messages as one prompt text: a ``role: content`` line each.

    Content may be a string or OpenAI's list of parts (the text parts are
    joined). This is the built-in rendering every component shares; a
    served model's own template counts differently.

    Raises:
        ConfigError: a message that is not a mapping with a role.
    """
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise ConfigError(f"messages[{i}]: expected an object with a 'role' string")
        content = m.get("content") or ""
        if isinstance(content, list):
            content = " ".join(
                str(part.get("text", "")) for part in content if isinstance(part, Mapping)
            )
        lines.append(f"{m['role']}: {content}")
    return "\n".join(lines)
