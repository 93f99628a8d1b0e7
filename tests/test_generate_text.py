"""Text in, text out: `rdlm.generate` with a tokenizer (tiny config, zero initial state)."""

from __future__ import annotations

import numpy as np
import pytest
import tokenizers

import rdlm
from rdlm.data.tokenizer import HFTokenizer, load_tokenizer
from tests.test_sample import perturbed_params

CFG = rdlm.model_preset("tiny")
TEXTS = ["a=1;b=a;?b", "hello world", "x+y="]


@pytest.fixture(scope="module")
def params():
    return perturbed_params(CFG)


def gen(params, prompts, **kwargs):
    return rdlm.generate(params, CFG, prompts, **{"max_new_tokens": 8, "num_steps": 4, **kwargs})


def test_text_prompts_equal_their_ids_and_come_back_as_text(params):
    tok = load_tokenizer("chars")
    out = gen(params, TEXTS, tokenizer=tok)
    ids = gen(params, [tok.prompt(t) for t in TEXTS])
    np.testing.assert_array_equal(out.tokens, ids.tokens)
    assert ids.texts is None
    assert out.texts == [tok.decode(r, skip_special_tokens=True) for r in ids.rows()]
    # One string is one prompt; bos=False leaves the BOS out; id lists mix with text.
    one = gen(params, TEXTS[1], tokenizer=tok, bos=False)
    np.testing.assert_array_equal(one.tokens, gen(params, [tok.encode(TEXTS[1])]).tokens)
    mixed = gen(params, [TEXTS[0], tok.prompt(TEXTS[2])], tokenizer=tok)
    np.testing.assert_array_equal(mixed.tokens, out.tokens[[0, 2]])
    assert mixed.texts == [out.texts[0], out.texts[2]]


def word_tokenizer(tmp_path, eos_id: int) -> HFTokenizer:
    """A word-level tokenizer.json over the tiny vocabulary whose end-of-text token has id
    ``eos_id`` (BOS id 1)."""
    vocab = {f"w{i}": i for i in range(CFG.vocab_size)}
    vocab = {("<|begin_text|>" if i == 1 else "<|end_text|>" if i == eos_id else w): i
             for w, i in vocab.items()}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    hf.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    hf.add_special_tokens(["<|begin_text|>", "<|end_text|>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    return HFTokenizer(tmp_path)


def test_a_tokenizer_stops_rows_at_its_end_of_text_and_the_text_ends_before_it(params, tmp_path):
    prompt = "w5 w9 w13 w2"
    plain = word_tokenizer(tmp_path, eos_id=3)
    free = gen(params, prompt, tokenizer=plain, stop_tokens=())
    row = free.tokens[0].tolist()
    # The end of text: a later generated token that differs from every one before it (and from
    # the prompt's, whose spellings stay words).
    cut = next(k for k in range(1, len(row)) if row[k] not in row[:k] + [1, 5, 9, 13, 2])
    eos = row[cut]
    (tmp_path / "eos").mkdir()
    tok = word_tokenizer(tmp_path / "eos", eos_id=eos)
    assert tok.stop_ids == (eos,)
    out = gen(params, prompt, tokenizer=tok)  # default stop: the tokenizer's end of text
    assert out.rows() == [row[:cut + 1]]
    assert out.texts == [" ".join(f"w{i}" for i in row[:cut])]
    # An explicit stop list wins over the tokenizer's.
    assert gen(params, prompt, tokenizer=tok, stop_tokens=()).rows() == [row]


def test_text_without_a_tokenizer_names_the_fix(params):
    with pytest.raises(ValueError, match="no tokenizer was given: pass tokenizer="):
        gen(params, ["hello"])
    with pytest.raises(ValueError, match="more than the model's vocab_size"):
        gen(params, ["hello"], tokenizer=load_tokenizer("ascii"))
