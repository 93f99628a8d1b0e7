"""Branch rendering (data.branches): every question of a context, each isolated, in one row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
from rdlm.data import make_train_iterator
from rdlm.data.render import render, render_branches
from rdlm.data.tasks import Example, chains_questions, example_at, make_task, solve_chains, split_of
from rdlm.data.tokenizer import load_tokenizer

TOK = load_tokenizer("chars")


def _example(i: int = 0) -> Example:
    return example_at(make_task("chains", 2), "train", i)


def test_chains_questions_cover_every_variable_with_solved_answers():
    ex = _example()
    qs = chains_questions(ex)
    body = ex.question.rsplit(";?", 1)[0]
    assert len(qs) == len(body.split(";"))
    assert (ex.question, ex.answer) in qs
    assert all(a == solve_chains(q) and a.isdigit() for q, a in qs)


def test_each_branch_is_the_single_question_rendering():
    qs = chains_questions(_example(1))
    tokens, mask, branch = render_branches(qs, TOK)
    trunk = tokens[branch == 0]
    for k, (q, a) in enumerate(qs, start=1):
        alone_tokens, alone_mask = render(Example(q, (), a), TOK)
        np.testing.assert_array_equal(np.concatenate([trunk, tokens[branch == k]]), alone_tokens)
        np.testing.assert_array_equal(mask[branch == k][1:], alone_mask[len(trunk) + 1:])


def test_training_rows_hold_no_held_out_question():
    cfg = rdlm.load_config("configs/tiny.yaml", ["data.branches=true", "data.difficulty=3",
                                                  "train.batch_size=8", "train.seq_len=160",
                                                  "model.max_seq_len=160",
                                                  "data.prefetch_batches=0"])
    batch = next(make_train_iterator(cfg))
    assert batch["branch_ids"].max() > 1
    for row in range(8):
        ids, br = batch["inputs"][row], batch["branch_ids"][row]
        trunk = TOK.decode(ids[(br == 0) & (batch["segment_ids"][row] > 0)].tolist())
        context = trunk.replace("<bos>", "")
        for k in range(1, br.max() + 1):
            var = TOK.decode(ids[br == k].tolist())[0]
            assert split_of(context + var) == "train"


@pytest.mark.parametrize("token_shift", [0, 2])
def test_branch_row_loss_equals_each_question_alone(token_shift):
    cfg = rdlm.model_preset("tiny", token_shift=token_shift)
    params = rdlm.init_params(cfg, jax.random.key(0))
    if token_shift:  # a branch's first token must see the trunk's last tokens, not a sibling's
        params["token_shift"] = 0.3 * jax.random.normal(jax.random.key(1),
                                                        params["token_shift"].shape)
    qs = chains_questions(_example(2))
    tokens, mask, branch = render_branches(qs, TOK)
    batch = {"inputs": jnp.asarray(tokens[None, :-1]), "targets": jnp.asarray(tokens[None, 1:]),
             "loss_mask": jnp.asarray(mask[None, 1:]), "branch_ids": jnp.asarray(branch[None, :-1])}
    loss, metrics = rdlm.lm_loss(params, batch, cfg, n_no_grad=1, n_grad=2, init_scale=0.0)
    total, count = 0.0, 0
    for q, a in qs:
        t, m = render(Example(q, (), a), TOK)
        single = {"inputs": jnp.asarray(t[None, :-1]), "targets": jnp.asarray(t[None, 1:]),
                  "loss_mask": jnp.asarray(m[None, 1:])}
        l1, m1 = rdlm.lm_loss(params, single, cfg, n_no_grad=1, n_grad=2, init_scale=0.0)
        total += float(l1) * float(m1["num_tokens"])
        count += float(m1["num_tokens"])
    assert float(metrics["num_tokens"]) == count
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)


def test_branches_config_errors():
    with pytest.raises(rdlm.ConfigError, match="data.branches"):
        rdlm.load_config(None, ["data.branches=true", "data.task=addition"])
    with pytest.raises(rdlm.ConfigError, match="data.branches"):
        rdlm.load_config(None, ["data.branches=true", "data.format=cot"])
