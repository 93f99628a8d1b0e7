"""Tokenizers: a fixed character vocabulary for the synthetic tasks, and `tokenizer.json` files.

Both expose the same small interface (`Tokenizer`): ``encode(text) -> list[int]``,
``decode(ids) -> str``, ``vocab_size`` and the ids of the special tokens. The character vocabulary
is fixed and shipped in code (no files, no network), so a task's token ids never change between
runs and fit the 64-entry vocabulary of the ``tiny`` model preset.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Protocol, Sequence

# Specials first, so their ids are the same in every character vocabulary.
PAD, BOS, EOS, BOT, EOT, LATENT = "<pad>", "<bos>", "<eos>", "<bot>", "<eot>", "<latent>"
SPECIAL_TOKENS = (PAD, BOS, EOS, BOT, EOT, LATENT)

# 6 specials + 10 digits + 26 letters + 19 punctuation/whitespace = 61 <= 64 ("tiny" preset).
CHARS_ALPHABET = string.digits + string.ascii_lowercase + " =;?+-*/.,:<>#()|!\n"
# Printable ASCII (for user-supplied text such as GSM8k-Aug): 6 + 95 + newline = 102.
ASCII_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"


class Tokenizer(Protocol):
    """What the data pipeline and the evaluator need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    bot_id: int | None
    eot_id: int | None
    latent_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class CharTokenizer:
    """One token per character of a fixed alphabet, after the six special tokens.

    Unknown characters raise a `ValueError` naming them (a silent <unk> would let a task quietly
    lose information).
    """

    def __init__(self, alphabet: str = CHARS_ALPHABET, name: str = "chars"):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("tokenizer alphabet has repeated characters.")
        self.name = name
        self.tokens = list(SPECIAL_TOKENS) + list(alphabet)
        self._ids = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(alphabet)}
        self.vocab_size = len(self.tokens)
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.bot_id, self.eot_id, self.latent_id = 3, 4, 5

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError:
            bad = sorted({c for c in text if c not in self._ids})
            raise ValueError(f"{self.name} tokenizer cannot encode characters {bad!r} "
                             f"(in {text[:60]!r}); its alphabet is {''.join(self._ids)!r}.") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.tokens[int(i)] for i in ids if 0 <= int(i) < self.vocab_size)

    def token_id(self, token: str) -> int:
        return self.tokens.index(token)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (the `tokenizers` library), e.g. Huginn's.

    Special tokens are looked up by the names used by Huginn (``<|begin_text|>``, …) and by the
    common alternatives; `eos` is required because documents are separated by it.
    """

    _NAMES = {
        "bos": ("<|begin_text|>", "<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>"),
        "eos": ("<|end_text|>", "<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>"),
        "pad": ("<|pad|>", "<pad>", "[PAD]"),
        "bot": ("<bot>", "<|begin_thought|>"),
        "eot": ("<eot>", "<|end_thought|>"),
        "latent": ("<latent>", "<|latent|>"),
    }

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok  # imported lazily: only file tokenizers need it
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist.")
        self.path = path
        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        found = {role: self._find(names) for role, names in self._NAMES.items()}
        if found["eos"] is None:
            raise ValueError(f"tokenizer {str(path)!r} has no end-of-text token; expected one of "
                             f"{self._NAMES['eos']}.")
        self.eos_id = found["eos"]
        self.bos_id = found["bos"] if found["bos"] is not None else self.eos_id
        self.pad_id = found["pad"] if found["pad"] is not None else self.eos_id
        self.bot_id, self.eot_id, self.latent_id = found["bot"], found["eot"], found["latent"]

    def _find(self, names: Sequence[str]) -> int | None:
        for name in names:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


_BUILTIN = {"chars": CHARS_ALPHABET, "ascii": ASCII_ALPHABET}


def load_tokenizer(spec: str) -> Tokenizer:
    """``"chars"`` (61 tokens), ``"ascii"`` (102 tokens) or a path to a ``tokenizer.json``."""
    if spec in _BUILTIN:
        return CharTokenizer(_BUILTIN[spec], name=spec)
    return HFTokenizer(spec)
