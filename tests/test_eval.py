"""Evaluation: batched greedy answers from the generation engine equal a one-row full-forward
reference; one compilation for every r; accuracies; the eval command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rdlm
from rdlm.config import ConfigError
from rdlm.data.tasks import Example
from rdlm.cli.eval import cli
from rdlm.generation.evaluate import evaluate_accuracy, greedy_answers
from rdlm.generation.programs import generate_jit


@pytest.fixture(scope="module")
def tiny():
    cfg = rdlm.load_config("configs/tiny.yaml")
    return cfg, rdlm.init_params(cfg.model, jax.random.key(0))


def _reference_greedy(params, cfg, prompt, r, n, width=12):
    """One row, one token at a time, in Python; zero-padded to one width (causal attention makes
    the padding irrelevant) so that the reference compiles once."""
    tokens = list(prompt)
    for _ in range(n):
        row = np.zeros((1, width), np.int32)
        row[0, :len(tokens)] = tokens
        logits, _ = rdlm.forward(params, jnp.asarray(row), cfg.model, num_steps=r, init_scale=0.0)
        tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
    return tokens[len(prompt):]


def test_batched_greedy_matches_one_row_at_a_time(tiny):
    cfg, params = tiny
    prompts = [[1, 10, 11, 12, 13, 14], [1, 20, 21], [1, 30, 31, 32, 33]]
    n = 4
    answers = greedy_answers(params, cfg.model, prompts, num_steps=3, max_new_tokens=n,
                             eos_id=None, cache_budget=4)
    for i, p in enumerate(prompts):
        assert len(answers[i]) == n
        assert answers[i] == _reference_greedy(params, cfg, p, 3, n)


def test_generation_stops_after_eos(tiny):
    cfg, params = tiny
    prompt = [1, 10, 11]
    first = _reference_greedy(params, cfg, prompt, 2, 1)[0]
    out = rdlm.generate(params, cfg.model, [prompt], max_new_tokens=4, num_steps=2,
                        stop_tokens=[first])
    assert out.rows() == [[first]] and out.tokens[0, 1:].tolist() == [0] * 3
    assert greedy_answers(params, cfg.model, [prompt], num_steps=2, max_new_tokens=4,
                          eos_id=first) == [[]]


def test_one_compilation_serves_every_r_and_batch(tiny):
    cfg, params = tiny
    before = generate_jit._cache_size()
    result = evaluate_accuracy(params, cfg, "chains", num_steps_list=[3, 2, 1], num_examples=3,
                               batch_size=2)
    assert generate_jit._cache_size() - before <= 1  # 3 values of r x 2 batches
    assert all(len(p) == 3 for p in result["predictions"].values())


def test_accuracy_for_every_r_on_a_fresh_model(tiny):
    cfg, params = tiny
    result = evaluate_accuracy(params, cfg, "chains", num_steps_list=[1, 2, 4], num_examples=10,
                               batch_size=4)
    assert set(result["accuracy"]) == {1, 2, 4}
    assert all(0.0 <= a <= 1.0 for a in result["accuracy"].values())
    assert all(len(p) == 10 for p in result["predictions"].values())
    assert set(result["shortcuts"]) >= {"first_digit", "nearest_digit_before_query"}


def test_exact_match_scores_the_parsed_answer(tiny):
    cfg, params = tiny
    examples = [Example("a=1;?a", ("a=1",), "1"), Example("b=2;?b", ("b=2",), "2")]
    base = evaluate_accuracy(params, cfg, "chains", num_steps_list=[2], examples=examples,
                             max_new_tokens=3)
    # Whatever the untrained model says becomes the reference answer: accuracy must be 1.
    relabelled = [Example(e.question, e.steps, p) for e, p in zip(examples, base["predictions"][2])]
    again = evaluate_accuracy(params, cfg, "chains", num_steps_list=[2], examples=relabelled,
                              max_new_tokens=3)
    assert again["accuracy"][2] == 1.0


def test_eval_errors(tiny):
    cfg, params = tiny
    with pytest.raises(ConfigError, match="max_seq_len"):
        evaluate_accuracy(params, cfg, "prosqa", num_steps_list=[1], num_examples=2)
    with pytest.raises(ConfigError, match="coconut"):
        evaluate_accuracy(params, cfg, num_steps_list=[1], num_examples=2, fmt="coconut")


def test_eval_command_writes_json_and_markdown(tiny, tmp_path, capsys):
    from rdlm.runtime.checkpoint import save_params
    cfg, params = tiny
    save_params(tmp_path / "ckpt", cfg, params)
    assert cli(["--checkpoint", str(tmp_path / "ckpt"), "--task", "addition", "--num-steps", "1,4",
                "--num-examples", "6", "--json", str(tmp_path / "r.json"),
                "--markdown", str(tmp_path / "r.md")]) == 0
    out = capsys.readouterr().out
    assert "| 1 |" in out and "| 4 |" in out and "addition" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["accuracy"]) == {"1", "4"} and result["num_examples"] == 6
    assert "| r | accuracy |" in (tmp_path / "r.md").read_text()
    with pytest.raises(ConfigError, match="num-steps"):
        cli(["--checkpoint", str(tmp_path / "ckpt"), "--num-steps", "1,x"])


def test_eval_reads_independently_generated_problems(tiny, tmp_path, capsys):
    from rdlm.runtime.checkpoint import save_params
    cfg, params = tiny
    save_params(tmp_path / "ckpt", cfg, params)
    problems = tmp_path / "mine.jsonl"
    problems.write_text('{"question": "q=4;z=q;?z", "answer": "4", "steps": ["z=4", "q=4"]}\n'
                        '{"question": "k=2;m=8;?m", "answer": "8"}\n\n')
    assert cli(["--checkpoint", str(tmp_path / "ckpt"), "--problems", str(problems),
                "--num-steps", "1,2", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_examples"] == 2 and result["answers"] == ["4", "8"]
    assert len(result["predictions"]["2"]) == 2
    problems.write_text('{"question": "a=1;?a"}\n')
    with pytest.raises(ConfigError, match="line 1"):
        cli(["--checkpoint", str(tmp_path / "ckpt"), "--problems", str(problems)])
