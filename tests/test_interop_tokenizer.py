"""tokenizer.json interop: a tiny byte-level BPE tokenizer trained here, offline, with Huginn's
special tokens; and the fall-back to SPEC's ids for a Huginn-sized vocabulary."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from rdlm.interop import load_tokenizer
from rdlm.interop.tokenizer import SPECIAL_TOKENS

SPECIALS = [name for name, _ in SPECIAL_TOKENS.values()]
CORPUS = ["The capital of Westphalia is Münster.", "def f(x):\n    return x * 2  # 🙂",
          "Recurrent depth: think longer, not wider."] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    return path


def test_round_trip_and_special_ids(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert load_tokenizer(tokenizer_dir / "tokenizer.json").special_ids == tok.special_ids
    for text in CORPUS[:3] + ["unseen wörds ∑ and tabs\t!"]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Special ids come from the token names (here the trainer put them first).
    assert tok.special_ids == {role: SPECIALS.index(name) for role, (name, _) in SPECIAL_TOKENS.items()}
    assert tok.bos_id == 0 and tok.stop_ids == (tok.eos_id, tok.end_turn_id)
    prompt = tok.prompt("The capital")
    assert prompt[0] == tok.bos_id and prompt[1:] == tok.encode("The capital")
    assert tok.decode(prompt) == "The capital"
    assert tok.decode(prompt, skip_special_tokens=False) == "<|begin_text|>The capital"


def test_chat_prompt_uses_huginn_format(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = tok.chat_text(messages)
    assert text == ("<|begin_text|><|begin_header|>system<|end_header|>\n\nBe brief.<|end_turn|>"
                    "<|begin_header|>user<|end_header|>\n\n2+2?<|end_turn|>"
                    "<|begin_header|>Huginn<|end_header|>\n\n")
    ids = tok.chat_prompt(messages)
    assert ids[0] == tok.bos_id and ids.count(tok.end_turn_id) == 2
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_pad_batch_marks_padding_with_segment_zero(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    tokens, segments = tok.pad_batch([[7, 8, 9], [5]])
    np.testing.assert_array_equal(tokens, [[7, 8, 9], [tok.pad_id, tok.pad_id, 5]])
    np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])
    tokens, segments = tok.pad_batch([[5]], side="right", length=3)
    np.testing.assert_array_equal(segments, [[1, 0, 0]])


def test_huginn_sized_vocab_falls_back_to_spec_ids(tmp_path):
    vocab = {f"t{i}": i for i in range(65_536)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.save(str(tmp_path / "tokenizer.json"))
    ids = load_tokenizer(tmp_path).special_ids
    assert (ids["begin_text"], ids["end_text"], ids["end_turn"], ids["pad"]) == (65504, 65505, 65508, 65509)
    small = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    small.save(str(tmp_path / "small.json"))
    small_tok = load_tokenizer(tmp_path / "small.json")
    assert small_tok.bos_id is None and small_tok.stop_ids == ()
    with pytest.raises(ValueError, match="bos=False"):
        small_tok.prompt("a")


def test_missing_or_broken_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
