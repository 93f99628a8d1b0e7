"""Text <-> token ids through a Hugging Face ``tokenizer.json`` (the `tokenizers` library).

Huginn-0125's tokenizer has 65,536 entries; its special tokens (SPEC §1) are
``<|begin_text|>`` 65504 (starts every document: the BOS of a prompt), ``<|end_text|>`` 65505,
``<|end_turn|>`` 65508 (end of a chat turn) and ``<|pad|>`` 65509. Ids are looked up by token name;
only a Huginn-sized vocabulary without those names falls back to the ids above.

    tok = load_tokenizer("path/to/huginn-0125")          # a directory or the tokenizer.json itself
    ids = tok.prompt("The capital of Westphalia is")     # [begin_text] + encode(text)
    tok.decode(generated_ids)                             # text, special tokens dropped
    tok.stop_ids                                          # (end_text, end_turn): where sampling stops
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

HUGINN_VOCAB_SIZE = 65_536
# Role -> (token text, id in Huginn-0125's vocabulary).
SPECIAL_TOKENS: dict[str, tuple[str, int | None]] = {
    "begin_text": ("<|begin_text|>", 65504),
    "end_text": ("<|end_text|>", 65505),
    "begin_header": ("<|begin_header|>", None),
    "end_header": ("<|end_header|>", None),
    "end_turn": ("<|end_turn|>", 65508),
    "pad": ("<|pad|>", 65509),
}
# The name Huginn-0125's chat format gives the model's own turns.
ASSISTANT_ROLE = "Huginn"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special ids that prompts and sampling need."""

    def __init__(self, tokenizer, special_ids: Mapping[str, int | None]):
        self.tokenizer = tokenizer
        self.special_ids = dict(special_ids)

    # -- ids -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """``<|begin_text|>``: put in front of every prompt (the model saw it before every document)."""
        return self.special_ids.get("begin_text")

    @property
    def eos_id(self) -> int | None:
        return self.special_ids.get("end_text")

    @property
    def end_turn_id(self) -> int | None:
        return self.special_ids.get("end_turn")

    @property
    def pad_id(self) -> int | None:
        return self.special_ids.get("pad")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: end of text and end of a chat turn (those that exist)."""
        return tuple(i for i in (self.eos_id, self.end_turn_id) if i is not None)

    # -- text ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as written; special-token strings inside it become their ids.

        No BOS/EOS is added (the tokenizer's own post-processor is bypassed): use `prompt`.
        """
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def prompt(self, text: str, *, bos: bool = True) -> list[int]:
        """Ids for a plain-text prompt: ``[begin_text] + encode(text)``."""
        ids = self.encode(text)
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no <|begin_text|> token; pass bos=False.")
            ids = [self.bos_id] + ids
        return ids

    def chat_text(self, messages: Sequence[Mapping[str, str]], *,
                  add_generation_prompt: bool = True) -> str:
        """Huginn-0125's chat format as text:
        ``<|begin_text|>`` then per message ``<|begin_header|>ROLE<|end_header|>\\n\\nCONTENT<|end_turn|>``,
        then ``<|begin_header|>Huginn<|end_header|>\\n\\n`` for the reply."""
        names = {role: SPECIAL_TOKENS[role][0] for role in ("begin_text", "begin_header",
                                                            "end_header", "end_turn")}
        lacking = [names[r] for r in names if self.special_ids.get(r) is None]
        if lacking:
            raise ValueError(f"this tokenizer lacks the chat tokens {lacking}.")
        parts = [names["begin_text"]]
        for message in messages:
            parts.append(f"{names['begin_header']}{message['role']}{names['end_header']}\n\n"
                         f"{message['content']}{names['end_turn']}")
        if add_generation_prompt:
            parts.append(f"{names['begin_header']}{ASSISTANT_ROLE}{names['end_header']}\n\n")
        return "".join(parts)

    def chat_prompt(self, messages: Sequence[Mapping[str, str]], *,
                    add_generation_prompt: bool = True) -> list[int]:
        """Ids of `chat_text` (messages are dicts with ``role`` and ``content``)."""
        return self.encode(self.chat_text(messages, add_generation_prompt=add_generation_prompt))

    def pad_batch(self, sequences: Sequence[Sequence[int]], *, side: str = "left",
                  length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens [batch, length] int32, segment_ids [batch, length] int32)``.

        Padding uses the pad id (0 if there is none) and segment id 0, so that
        ``rdlm.forward(..., segment_ids=segment_ids)`` ignores it; left padding keeps every
        prompt's last token in the last column, where generation continues.
        """
        if side not in ("left", "right"):
            raise ValueError(f"side={side!r} must be 'left' or 'right'.")
        longest = max((len(s) for s in sequences), default=0)
        length = longest if length is None else length
        if longest > length:
            raise ValueError(f"a sequence has {longest} tokens, more than length={length}.")
        pad = 0 if self.pad_id is None else self.pad_id
        tokens = np.full((len(sequences), length), pad, np.int32)
        segments = np.zeros((len(sequences), length), np.int32)
        for row, seq in enumerate(sequences):
            span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
            tokens[row, span] = np.asarray(seq, np.int32)
            segments[row, span] = 1
        return tokens, segments

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_ids={self.special_ids})"


def special_ids_of(tokenizer) -> dict[str, int | None]:
    """Special ids by token name; a Huginn-sized vocabulary lacking a name gets SPEC's id."""
    huginn_sized = tokenizer.get_vocab_size(with_added_tokens=True) == HUGINN_VOCAB_SIZE
    ids: dict[str, int | None] = {}
    for role, (name, default) in SPECIAL_TOKENS.items():
        found = tokenizer.token_to_id(name)
        ids[role] = found if found is not None else (default if huginn_sized else None)
    return ids


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A `Tokenizer` from a ``tokenizer.json`` file or a directory holding one."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {str(file)!r}: give the file or the "
                                "checkpoint directory that holds it.")
    try:
        tokenizer = HFTokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises a plain Exception for bad files
        raise ValueError(f"{str(file)!r} is not a valid tokenizer.json: {err}") from err
    return Tokenizer(tokenizer, special_ids_of(tokenizer))
