"""tokenizer.json through the one tokenizer interface (`rdlm.data.tokenizer`): a tiny byte-level
BPE tokenizer trained here, offline, with Huginn's special tokens; a GPT-2-style one whose only
special token is <|endoftext|>; and the fall-back to SPEC's ids for a Huginn-sized vocabulary."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rdlm.data.tokenizer import (SPECIAL_TOKENS, CharTokenizer, HFTokenizer, MissingTokenError,
                                 load_tokenizer)

HUGINN_SPECIALS = {"bos": "<|begin_text|>", "eos": "<|end_text|>", "begin_header": "<|begin_header|>",
                   "end_header": "<|end_header|>", "end_turn": "<|end_turn|>", "pad": "<|pad|>"}
SPECIALS = list(HUGINN_SPECIALS.values())
CORPUS = ["The capital of Westphalia is Münster.", "def f(x):\n    return x * 2  # 🙂",
          "Recurrent depth: think longer, not wider."] * 20


def train_bpe(path, special_tokens, vocab_size=400, corpus=CORPUS):
    """A byte-level BPE tokenizer.json trained offline on ``corpus``; returns its path."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_bpe(path / "tokenizer.json", SPECIALS)
    return path


def test_every_huginn_spelling_is_in_the_role_table():
    for role, name in HUGINN_SPECIALS.items():
        assert SPECIAL_TOKENS[role][0] == name


def test_round_trip_and_special_ids(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert isinstance(tok, HFTokenizer)
    assert load_tokenizer(tokenizer_dir / "tokenizer.json").special_ids == tok.special_ids
    for text in CORPUS[:3] + ["unseen wörds ∑ and tabs\t!"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Special ids come from the token names (here the trainer put them first).
    found = {role: i for role, i in tok.special_ids.items() if i is not None}
    assert found == {role: SPECIALS.index(name) for role, name in HUGINN_SPECIALS.items()}
    assert tok.bot_id is None and tok.latent_id is None
    assert tok.bos_id == 0 and tok.stop_ids == (tok.eos_id, tok.end_turn_id)
    prompt = tok.prompt("The capital")
    assert prompt[0] == tok.bos_id and prompt[1:] == tok.encode("The capital")
    assert tok.decode(prompt, skip_special_tokens=True) == "The capital"
    assert tok.decode(prompt) == "<|begin_text|>The capital"


def test_chat_prompt_uses_huginn_format(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = tok.chat_text(messages)
    assert text == ("<|begin_text|><|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>"
                    "<|begin_header|>user<|end_header|>\n\n2+2?<|end_turn|>"
                    "<|begin_header|>Huginn<|end_header|>\n\n")
    ids = tok.chat_prompt(messages)
    assert ids[0] == tok.bos_id and ids.count(tok.end_turn_id) == 2
    assert tok.decode(ids) == text
    with pytest.raises(MissingTokenError, match="begin_header"):
        CharTokenizer().chat_text(messages)


def test_pad_batch_marks_padding_with_segment_zero(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    tokens, segments = tok.pad_batch([[7, 8, 9], [5]])
    np.testing.assert_array_equal(tokens, [[7, 8, 9], [tok.pad_id, tok.pad_id, 5]])
    np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])
    tokens, segments = tok.pad_batch([[5]], side="right", length=3)
    np.testing.assert_array_equal(segments, [[1, 0, 0]])


def test_gpt2_style_tokenizer_has_one_token_for_both_ends(tmp_path):
    tok = load_tokenizer(train_bpe(tmp_path / "gpt2.json", ["<|endoftext|>"]))
    assert tok.bos_id == tok.eos_id == 0 and tok.stop_ids == (0,)
    assert tok.special_ids["pad"] is None and tok.pad_id == tok.eos_id  # pads with end-of-text
    assert tok.prompt("The capital")[0] == 0
    for role in ("bot", "latent", "end_turn"):
        assert tok.special_ids[role] is None
    with pytest.raises(MissingTokenError, match=r"latent-thought token, role 'latent' \(needed for "
                                                r"data.format='coconut'\); fix: add one of <latent>"):
        tok.require("latent", "data.format='coconut'")


def test_huginn_sized_vocab_falls_back_to_spec_ids(tmp_path):
    vocab = {f"t{i}": i for i in range(65_536)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.save(str(tmp_path / "tokenizer.json"))
    ids = load_tokenizer(tmp_path).special_ids
    assert (ids["bos"], ids["eos"], ids["end_turn"], ids["pad"]) == (65504, 65505, 65508, 65509)
    small = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    small.save(str(tmp_path / "small.json"))
    small_tok = load_tokenizer(tmp_path / "small.json")
    assert small_tok.bos_id is None and small_tok.pad_id is None and small_tok.stop_ids == ()
    with pytest.raises(MissingTokenError, match="beginning-of-text.*bos=False"):
        small_tok.prompt("a", bos=True)
    assert small_tok.prompt("a") == small_tok.prompt("a", bos=False) == [0]  # none to put
    assert small_tok.pad_batch([[1], [1, 1]])[0].tolist() == [[0, 1], [1, 1]]


def test_missing_or_broken_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
