"""One tokenizer interface for training data, tasks, evaluation, sampling and Huginn interop.

Two implementations sit behind `Tokenizer`:

- `CharTokenizer`: one token per character of a fixed alphabet, shipped in code (no files, no
  network), so a task's token ids never change between runs: ``"chars"`` (61 tokens, fits the
  64-entry vocabulary of the ``tiny`` preset) and ``"ascii"`` (102 tokens, printable ASCII);
- `HFTokenizer`: a Hugging Face ``tokenizer.json`` (the `tokenizers` library): Huginn-0125's,
  GPT-2's, Llama's or one trained for a corpus.

Special tokens are known by *role* (`SPECIAL_TOKENS`): each role lists the spellings it has in
common vocabularies, and a tokenizer's id for a role is the id of the first spelling its vocabulary
holds, or None when it holds none. Code that needs a role calls ``tok.require(role)``, which raises
`MissingTokenError` naming the role, the spellings looked for and the fix.

    tok = load_tokenizer("chars")                     # "ascii", a tokenizer.json, or its directory
    ids = tok.prompt("The capital of Westphalia is")  # [bos] + encode(text), if it has a bos
    tok.decode(ids, skip_special_tokens=True)         # text without <bos>/<eos>/…
    tok.stop_ids                                      # (eos, end_turn), those that exist
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import tokenizers

from rdlm.errors import ConfigError
from rdlm.runtime.rundir import find_in_run
from rdlm.runtime.storage import StoragePath, as_path, is_remote

# Role -> spellings, most specific first; the first one a vocabulary holds gives the role's id.
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    # Starts a document, so it goes in front of a prompt. GPT-2 marks both ends with one token.
    "bos": ("<|begin_text|>", "<bos>", "<s>", "<|begin_of_text|>", "<|endoftext|>"),
    # Ends a document: `prepare` separates documents with it, and generation stops at it.
    "eos": ("<|end_text|>", "<eos>", "</s>", "<|end_of_text|>", "<|endoftext|>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]"),
    # Huginn-0125's chat format (`Tokenizer.chat_text`).
    "begin_header": ("<|begin_header|>",),
    "end_header": ("<|end_header|>",),
    "end_turn": ("<|end_turn|>",),
    # Continuous thought (Coconut): the latent block <bot> <latent>… <eot>.
    "bot": ("<bot>", "<|begin_thought|>"),
    "eot": ("<eot>", "<|end_thought|>"),
    "latent": ("<latent>", "<|latent|>"),
}
ROLE_MEANINGS: dict[str, str] = {
    "bos": "beginning-of-text", "eos": "end-of-text", "pad": "padding",
    "begin_header": "chat header start", "end_header": "chat header end", "end_turn": "end-of-turn",
    "bot": "begin-of-thought", "eot": "end-of-thought", "latent": "latent-thought",
}
# Huginn-0125's ids (SPEC §1), used only for a Huginn-sized vocabulary that lacks the names.
HUGINN_VOCAB_SIZE = 65_536
HUGINN_SPECIAL_IDS: dict[str, int] = {"bos": 65504, "eos": 65505, "end_turn": 65508, "pad": 65509}
# The name Huginn-0125's chat format gives the model's own turns.
ASSISTANT_ROLE = "Huginn"

# The character vocabularies: the specials first, so their ids are 0-5 in both.
CHAR_SPECIALS = ("<pad>", "<bos>", "<eos>", "<bot>", "<eot>", "<latent>")
# 6 specials + 10 digits + 26 letters + 19 punctuation/whitespace = 61 <= 64 ("tiny" preset).
CHARS_ALPHABET = string.digits + string.ascii_lowercase + " =;?+-*/.,:<>#()|!\n"
# Printable ASCII (for user-supplied text such as GSM8k-Aug): 6 + 95 + newline = 102.
ASCII_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n"
BUILTIN_ALPHABETS: dict[str, str] = {"chars": CHARS_ALPHABET, "ascii": ASCII_ALPHABET}


class MissingTokenError(ConfigError):
    """A tokenizer lacks a special token that the caller needs; the message names role and fix."""


def find_special_tokens(token_to_id: Callable[[str], int | None], vocab_size: int
                        ) -> tuple[dict[str, int | None], dict[str, str | None]]:
    """(role -> id, role -> spelling) of a vocabulary; None where it holds no spelling of a role.

    A Huginn-sized vocabulary without the names falls back to Huginn-0125's ids (spelling None).
    """
    ids: dict[str, int | None] = {}
    spellings: dict[str, str | None] = {}
    for role, candidates in SPECIAL_TOKENS.items():
        found = next(((name, i) for name in candidates
                      if (i := token_to_id(name)) is not None), (None, None))
        spellings[role], ids[role] = found
        if found[1] is None and vocab_size == HUGINN_VOCAB_SIZE:
            ids[role] = HUGINN_SPECIAL_IDS.get(role)
    return ids, spellings


class Tokenizer:
    """Text ⇄ ids and the special ids by role; `CharTokenizer` and `HFTokenizer` implement it.

    Subclasses set ``name``, ``vocab_size``, ``special_ids`` and ``special_spellings`` (see
    `find_special_tokens`) and implement `encode` and `decode`.
    """

    name: str
    vocab_size: int
    special_ids: dict[str, int | None]
    special_spellings: dict[str, str | None]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as written (special-token spellings inside it become their ids); no
        BOS/EOS is added: see `prompt`."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    # -- special ids -----------------------------------------------------------------------------
    def require(self, role: str, needed_for: str = "", otherwise: str = "") -> int:
        """The id of ``role``; if the vocabulary has none, `MissingTokenError` naming the role,
        what needs it (``needed_for``) and the fixes (``otherwise``: one more besides adding it)."""
        token_id = self.special_ids.get(role)
        if token_id is None:
            raise MissingTokenError(missing_token_message(self.name, role, needed_for, otherwise))
        return token_id

    @property
    def bos_id(self) -> int | None:
        return self.special_ids["bos"]

    @property
    def eos_id(self) -> int | None:
        return self.special_ids["eos"]

    @property
    def pad_id(self) -> int | None:
        """The id padding is filled with: the pad token, else the end-of-text token (padding is
        always masked, so any id serves; GPT-2 setups do the same)."""
        pad = self.special_ids["pad"]
        return pad if pad is not None else self.special_ids["eos"]

    @property
    def end_turn_id(self) -> int | None:
        return self.special_ids["end_turn"]

    @property
    def bot_id(self) -> int | None:
        return self.special_ids["bot"]

    @property
    def eot_id(self) -> int | None:
        return self.special_ids["eot"]

    @property
    def latent_id(self) -> int | None:
        return self.special_ids["latent"]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: end of text and end of a chat turn (those that exist)."""
        return tuple(dict.fromkeys(i for i in (self.eos_id, self.end_turn_id) if i is not None))

    # -- prompts ---------------------------------------------------------------------------------
    def prompt(self, text: str, *, bos: bool | None = None) -> list[int]:
        """Ids for a plain-text prompt: ``[bos] + encode(text)``, as `rdlm prepare` starts every
        document. ``bos=None`` puts the BOS in front when the tokenizer has one (a GPT-2-style
        tokenizer has only an end-of-text token, and its documents start without one);
        ``True`` insists on it, ``False`` leaves it out."""
        ids = self.encode(text)
        if bos is False or (bos is None and self.bos_id is None):
            return ids
        return [self.require("bos", "a prompt", "pass bos=False to prompt without one")] + ids

    def chat_text(self, messages: Sequence[Mapping[str, str]], *,
                  add_generation_prompt: bool = True) -> str:
        """Huginn-0125's chat format as text:
        ``<|begin_text|>`` then per message ``<|begin_header|>ROLE<|end_header|>\\n\\nCONTENT<|end_turn|>``,
        then ``<|begin_header|>Huginn<|end_header|>\\n\\n`` for the reply."""
        roles = ("bos", "begin_header", "end_header", "end_turn")
        lacking = [r for r in roles if self.special_spellings.get(r) is None]
        if lacking:
            raise MissingTokenError(missing_token_message(self.name, lacking[0], "the chat format"))
        bos, begin, end, end_turn = (self.special_spellings[r] for r in roles)
        parts = [bos]
        for message in messages:
            parts.append(f"{begin}{message['role']}{end}\n\n{message['content']}{end_turn}")
        if add_generation_prompt:
            parts.append(f"{begin}{ASSISTANT_ROLE}{end}\n\n")
        return "".join(parts)

    def chat_prompt(self, messages: Sequence[Mapping[str, str]], *,
                    add_generation_prompt: bool = True) -> list[int]:
        """Ids of `chat_text` (messages are dicts with ``role`` and ``content``)."""
        return self.encode(self.chat_text(messages, add_generation_prompt=add_generation_prompt))

    def pad_batch(self, sequences: Sequence[Sequence[int]], *, side: str = "left",
                  length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens [batch, length] int32, segment_ids [batch, length] int32)``.

        Padding uses `pad_id` (0 if there is none) and segment id 0, so that
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
        found = {r: i for r, i in self.special_ids.items() if i is not None}
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, {found})"


def missing_token_message(tokenizer: str, role: str, needed_for: str = "",
                          otherwise: str = "") -> str:
    """``error:`` text for a lacking role: what it is, what was looked for, how to fix it."""
    spellings = SPECIAL_TOKENS[role]
    why = f" (needed for {needed_for})" if needed_for else ""
    fixes = [f"add one of {', '.join(spellings)} to its tokenizer.json as a special token"]
    if set(spellings) & set(CHAR_SPECIALS):
        fixes.append("use the built-in 'chars' or 'ascii' tokenizer, which has it")
    if otherwise:
        fixes.append(otherwise)
    return (f"the tokenizer {tokenizer!r} has no {ROLE_MEANINGS[role]} token, role "
            f"{role!r}{why}; fix: {'; or '.join(fixes)}.")


class CharTokenizer(Tokenizer):
    """One token per character of a fixed alphabet, after the six special tokens.

    Unknown characters raise a `ValueError` naming them (a silent <unk> would let a task quietly
    lose information).
    """

    def __init__(self, alphabet: str = CHARS_ALPHABET, name: str = "chars"):
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("tokenizer alphabet has repeated characters.")
        self.name = name
        self.tokens = list(CHAR_SPECIALS) + list(alphabet)
        self._ids = {c: i + len(CHAR_SPECIALS) for i, c in enumerate(alphabet)}
        self.vocab_size = len(self.tokens)
        special = {s: i for i, s in enumerate(CHAR_SPECIALS)}
        self.special_ids, self.special_spellings = find_special_tokens(special.get,
                                                                       self.vocab_size)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError:
            bad = sorted({c for c in text if c not in self._ids})
            raise ValueError(f"the {self.name} tokenizer cannot encode characters {bad!r} (in "
                             f"{text[:60]!r}); its alphabet is {''.join(self._ids)!r}.") from None

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        first = len(CHAR_SPECIALS) if skip_special_tokens else 0
        return "".join(self.tokens[i] for i in map(int, ids) if first <= i < self.vocab_size)


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (a file, or a directory holding one)."""

    def __init__(self, path: str | os.PathLike):
        file = tokenizer_file(path)
        try:
            # read as text: the file may be in a bucket, which `from_file` cannot open
            self._tok = tokenizers.Tokenizer.from_str(file.read_text())
        except Exception as err:  # the tokenizers library raises a plain Exception for bad files
            raise ConfigError(f"{str(file)!r} is not a valid tokenizer.json ({err}); give the "
                              "tokenizer.json the `tokenizers` library saved.") from err
        self.name = str(file)
        self.path = file
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids, self.special_spellings = find_special_tokens(self._tok.token_to_id,
                                                                       self.vocab_size)

    def encode(self, text: str) -> list[int]:
        # The file's own post-processor (which may add BOS/EOS) is bypassed: see `prompt`.
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def tokenizer_file(path: str | os.PathLike) -> StoragePath:
    """The ``tokenizer.json`` meant by ``path``: the file itself or the one in a directory (on
    disk or in a bucket)."""
    path = as_path(path) if is_remote(path) else Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {str(file)!r}: give the file, a directory "
                                f"that holds it, or a built-in tokenizer {sorted(BUILTIN_ALPHABETS)}.")
    return file


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """``"chars"`` (61 tokens), ``"ascii"`` (102 tokens), a ``tokenizer.json`` or its directory."""
    if isinstance(spec, str) and spec in BUILTIN_ALPHABETS:
        return CharTokenizer(BUILTIN_ALPHABETS[spec], name=spec)
    return HFTokenizer(spec)


RUN_TOKENIZER = "tokenizer.json"  # the file name a run or export keeps its tokenizer under


def run_tokenizer(path: str | os.PathLike, spec: str | os.PathLike) -> Tokenizer:
    """The tokenizer a model at ``path`` was trained with: the ``tokenizer.json`` kept with it
    (in ``path``, or in the run directory above a ``<run>/checkpoints/<step>``), else ``spec``,
    the run's ``data.tokenizer`` (a built-in name or a file on this machine)."""
    kept = find_in_run(path, RUN_TOKENIZER)
    if kept is not None:
        return HFTokenizer(kept)
    try:
        return load_tokenizer(spec)
    except FileNotFoundError as err:
        raise ConfigError(f"the model at {str(path)!r} keeps no {RUN_TOKENIZER} and the "
                          f"tokenizer it was trained with ({str(spec)!r}) is not on this machine: "
                          "copy that tokenizer.json next to the checkpoint or pass the tokenizer "
                          "explicitly.") from err



# The special tokens a tokenizer trained by rdlm gets, in Huginn-0125's spellings (the first of
# each role in `SPECIAL_TOKENS`), so its ids 0-2 are pad, bos and eos.
TRAINED_SPECIALS = ("<|pad|>", "<|begin_text|>", "<|end_text|>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, path: str | os.PathLike
                        ) -> HFTokenizer:
    """A byte-level BPE ``tokenizer.json`` trained on ``texts`` (offline, with `tokenizers`),
    saved at ``path``: every byte is encodable, and pad/bos/eos are `TRAINED_SPECIALS`."""
    if vocab_size < 256 + len(TRAINED_SPECIALS):
        raise ConfigError(f"a BPE vocabulary of {vocab_size} is too small: it needs the 256 byte "
                          f"tokens and {len(TRAINED_SPECIALS)} specials; use e.g. bpe:2048.")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TRAINED_SPECIALS),
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return HFTokenizer(path)
