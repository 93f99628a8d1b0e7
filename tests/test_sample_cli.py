"""`python -m rdlm sample` and `python -m rdlm bench sample` end to end on a tiny checkpoint."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models

import rdlm
from rdlm.bench import sample as bench_sample
from rdlm.cli import main
from rdlm.cli.train import cli as train_cli
from rdlm.data.tokenizer import CharTokenizer, load_tokenizer
from rdlm.runtime import checkpoint
from tests.test_interop_tokenizer import train_bpe


def sample_cli(args: list[str]) -> int:
    """``rdlm sample ARGS`` as the command line runs it (errors become one line, status 2)."""
    return main(["sample", *args])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = rdlm.load_config("configs/tiny.yaml", ["sample.num_steps=3",
                                                    "sample.max_new_tokens=5"])
    params = rdlm.init_params(config.model, jax.random.key(0))
    path = tmp_path_factory.mktemp("ckpt") / "params"
    checkpoint.save_params(path, config, params)
    return path, config, params


def test_cli_prints_what_generate_returns(ckpt, capsys):
    path, config, params = ckpt
    status = sample_cli(["--checkpoint", str(path), "--tokens", "1,2,3", "--tokens", "9,8",
                         "--cache-budget", "2", "--json"])
    assert status == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = rdlm.generate(params, config.model, [[1, 2, 3], [9, 8]], max_new_tokens=5,
                             num_steps=3, cache_budget=2)
    assert [r["tokens"] for r in rows] == expected.rows()
    assert [r["steps"] for r in rows] == [[3] * 5, [3] * 5]
    # --param-dtype bfloat16 loads the parameters as bfloat16: generate's tokens with them.
    assert sample_cli(["--checkpoint", str(path), "--tokens", "1,2,3", "--tokens", "9,8",
                       "--cache-budget", "2", "--param-dtype", "bfloat16", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    half = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params)
    expected = rdlm.generate(half, config.model, [[1, 2, 3], [9, 8]], max_new_tokens=5,
                             num_steps=3, cache_budget=2)
    assert [r["tokens"] for r in rows] == expected.rows()


def test_cli_continuous_batching_prints_the_queue_in_order_and_its_schedule(ckpt, capsys):
    """Three prompts through 2 depth-continuous rows: the rows come back in prompt order, as
    `generate` returns them, and the schedule's numbers go to stderr."""
    path, config, params = ckpt
    prompts = [[1, 2, 3], [9, 8], [4, 5, 6, 7]]
    args = [a for ids in prompts for a in ("--tokens", ",".join(map(str, ids)))]
    status = sample_cli(["--checkpoint", str(path), *args, "--exit", "kl",
                         "--continuous-batching", "--batch-size", "2", "--json"])
    assert status == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    expected = rdlm.generate(params, config.model, prompts, max_new_tokens=5, num_steps=3,
                             exit="kl", continuous_batching=True, batch_size=2)
    assert [r["tokens"] for r in rows] == expected.rows()
    assert [r["steps"] for r in rows] == [s[:len(t)].tolist()
                                          for s, t in zip(expected.steps, expected.rows())]
    assert f"prefills {expected.stats['prefills']})" in captured.err
    assert f"over {expected.stats['iterations']} iterations" in captured.err
    # --boundary-wait reaches the scheduler: each wait's schedule is generate's with it.
    iterations = []
    for wait in (0, 1000):
        assert sample_cli(["--checkpoint", str(path), *args, "--exit", "kl", "--num-steps", "8",
                           "--continuous-batching", "--batch-size", "2", "--boundary-wait",
                           str(wait), "--json"]) == 0
        waited = rdlm.generate(params, config.model, prompts, max_new_tokens=5, num_steps=8,
                               exit="kl", continuous_batching=True, batch_size=2,
                               boundary_wait=wait)
        iterations.append(waited.stats["iterations"])
        assert f"over {iterations[-1]} iterations" in capsys.readouterr().err
    assert iterations[0] != iterations[1]
    # --stage-rows reaches the plan: one prompt staged at a time, a prefill per prompt.
    assert sample_cli(["--checkpoint", str(path), *args, "--exit", "kl", "--continuous-batching",
                       "--batch-size", "2", "--stage-rows", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["tokens"] for line in captured.out.splitlines()] == expected.rows()
    assert f"prefills {len(prompts)})" in captured.err
    for option in (["--boundary-wait", "3"], ["--stage-rows", "1"]):
        assert sample_cli(["--checkpoint", str(path), *args, *option]) == 2
        assert "continuous_batching" in capsys.readouterr().err


def test_cli_reports_bad_input(ckpt, capsys):
    path, _, _ = ckpt
    assert sample_cli(["--checkpoint", str(path), "--tokens", "1,999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    # The checkpoint's own tokenizer ('chars') encodes prompts; it has no capitals.
    assert sample_cli(["--checkpoint", str(path), "--prompt", "HELLO"]) == 2
    assert "chars tokenizer cannot encode characters" in capsys.readouterr().err
    assert sample_cli(["--checkpoint", str(path), "--prompt", "hi", "--tokenizer",
                       str(path / "absent.json")]) == 2
    assert "--tokenizer PATH" in capsys.readouterr().err
    # A mesh that asks for more devices than there are, or names an unknown axis.
    assert sample_cli(["--checkpoint", str(path), "--tokens", "1,2", "--mesh", "tensor=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "(3 devices) must divide the device count" in err
    with pytest.raises(SystemExit):
        sample_cli(["--checkpoint", str(path), "--tokens", "1,2", "--mesh", "model=2"])
    assert "'model' is not one of data, fsdp, tensor" in capsys.readouterr().err


def test_a_tokenizer_without_a_beginning_of_text_token(ckpt, tmp_path, capsys):
    # As `prepare` encodes documents: a BOS in front only when the tokenizer has one.
    path, _, _ = ckpt
    words = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    words.save(str(tmp_path / "words.json"))
    common = ["--checkpoint", str(path), "--tokenizer", str(tmp_path / "words.json"), "--prompt",
              "b", "--json"]
    assert sample_cli(common) == 0
    auto = json.loads(capsys.readouterr().out)
    assert sample_cli([*common, "--no-bos"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == auto["tokens"]
    assert len(auto["tokens"]) == 5  # no end-of-text: no stop


def test_prompts_from_a_file_and_stdin_are_echoed_and_empty_ones_refused(ckpt, tmp_path, capsys,
                                                                       monkeypatch):
    path, config, params = ckpt
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a=1;?a\n\nb=2;?b\n")
    assert sample_cli(["--checkpoint", str(path), "--prompt-file", str(prompts)]) == 0
    out = capsys.readouterr().out
    tok = CharTokenizer()
    expected = rdlm.generate(params, config.model, [tok.prompt("a=1;?a"), tok.prompt("b=2;?b")],
                             max_new_tokens=5, num_steps=3, stop_tokens=tok.stop_ids)
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert lines == [f"[{i}] {p}{tok.decode(ids, skip_special_tokens=True)}"
                     for i, (p, ids) in enumerate(zip(["a=1;?a", "b=2;?b"], expected.rows()))]
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("a=1;?a\n"))
    assert sample_cli(["--checkpoint", str(path), "--prompt", "-", "--no-echo", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tokens"] == expected.rows()[0] and record["prompt"] == ""
    assert sample_cli(["--checkpoint", str(path), "--prompt", " "]) == 2
    assert capsys.readouterr().err.startswith("error: prompt 0 is empty")
    assert sample_cli(["--checkpoint", str(path), "--prompt", "a", "--num-steps", "100000000"]) == 2
    assert "--num-steps=100000000 is invalid: must be an integer in [1, 1024]" in \
        capsys.readouterr().err


def test_prompt_uses_the_checkpoints_training_tokenizer(ckpt, capsys):
    path, config, params = ckpt
    assert sample_cli(["--checkpoint", str(path), "--prompt", "a=1;?a\n", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    tok = CharTokenizer()
    expected = rdlm.generate(params, config.model, [tok.prompt("a=1;?a\n")], max_new_tokens=5,
                             num_steps=3, stop_tokens=tok.stop_ids)
    assert record["tokens"] == expected.rows()[0]
    assert record["text"] == tok.decode(record["tokens"], skip_special_tokens=True)


def test_train_then_sample_with_a_gpt2_style_tokenizer(tmp_path, capsys):
    # GPT-2's tokenizer.json has one special token, <|endoftext|>, for both ends of a document.
    corpus = [f"{a}={d};{b}={a};?{b}\n#{d}" for a, b, d in zip("abcdefgh", "ijklmnop", "01234567")]
    tokenizer = train_bpe(tmp_path / "gpt2.json", ["<|endoftext|>"], vocab_size=300,
                          corpus=corpus * 10)
    vocab = load_tokenizer(tokenizer).vocab_size
    run = tmp_path / "run"
    assert train_cli(["configs/tiny.yaml", f"data.tokenizer={tokenizer}",
                      f"model.vocab_size={vocab}", "train.steps=2", "train.batch_size=2",
                      "train.seq_len=32", "model.max_seq_len=32", "train.eval_every=0",
                      "train.telemetry_every=0", "train.async_checkpoint=false",
                      "train.progress=lines", f"train.run_dir={run}"]) == 0
    capsys.readouterr()
    status = sample_cli(["--checkpoint", str(run), "--prompt", "a=1;b=a;?b\n",
                         "--max-new-tokens", "3", "--num-steps", "2"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    first = captured.out.splitlines()[0]
    assert first.startswith("[0] ") and "iterations per token" in captured.out


def test_default_length_shrinks_to_the_context_but_an_explicit_one_does_not(ckpt, capsys):
    path, config, _ = ckpt
    prompt = ",".join(["1"] * (config.model.max_seq_len - 2))  # room for 2 of the default 5
    assert sample_cli(["--checkpoint", str(path), "--tokens", prompt, "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)["tokens"]) == 2
    assert "generating 2 tokens" in captured.err
    assert sample_cli(["--checkpoint", str(path), "--tokens", prompt,
                       "--max-new-tokens", "5"]) == 2
    assert "max_seq_len" in capsys.readouterr().err


def test_bench_runs_on_a_preset(capsys, tmp_path):
    out = tmp_path / "bench.json"
    # Overrides may follow the flags, and apply to a preset as to a YAML config.
    status = bench_sample.bench_cli(["tiny", "--steps", "1,2", "--batches", "1", "--prompt-len", "4",
                               "--new-tokens", "3", "--variants", "full", "--json", str(out),
                               "model.dtype=bfloat16"])
    assert status == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["command"].startswith("python -m rdlm bench sample tiny")
    assert report["row_attention"] == "indexed"  # the CPU gathers each row's own entries
    assert [r["num_steps"] for r in rows] == [1, 2]
    printed = capsys.readouterr().out
    assert "bfloat16" in printed and "tokens/s" in printed
    assert all(r["tokens_per_s"] > 0 and r["weight_bytes_per_s"] > 0 for r in rows)
    assert np.isclose(bench_sample.weight_bytes_per_token(rdlm.model_preset("tiny"), 0),
                      4 * (rdlm.count_params(rdlm.model_preset("tiny"))
                           - sum(x.size for x in jax.tree.leaves(
                               rdlm.abstract_params(rdlm.model_preset("tiny"))["core"]))))


def test_bench_alternates_rounds_and_compares_within_each(capsys, tmp_path):
    """Two rounds of a queue of 6 prompts on 3 rows: lockstep batch after batch, continuous as
    one queue; the decoding rate leaves out each schedule's own prefills."""
    out = tmp_path / "bench.json"
    status = bench_sample.bench_cli(["tiny", "--steps", "4", "--batches", "3", "--prompt-len", "4",
                                     "--new-tokens", "3", "--variants",
                                     "full,exit,exit-continuous@0", "--rounds", "2",
                                     "--queue", "6", "--decode-rate", "--json", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    # Each round times every variant, back to back.
    assert [(r["round"], r["variant"]) for r in rows] == [
        (k, v) for k in (0, 1) for v in ("full", "exit", "exit-continuous@0")]
    assert all(r["queue"] == 6 and np.isclose(r["tokens_per_s"], 6 * 3 / r["seconds"])
               for r in rows)
    assert all(0 < r["row_utilization"] <= 1 for r in rows if r["variant"] != "full")
    for row in rows[1:3] + rows[4:6]:
        base = rows[0] if row["round"] == 0 else rows[3]
        expected = (row["tokens_per_s"] / base["tokens_per_s"]) / (4 / row["mean_iterations"])
        assert np.isclose(row["conversion"], expected)
    wait0 = [r for r in rows if r["variant"] == "exit-continuous@0"]
    assert all("boundary_passes" in r and "row_utilization" in r for r in wait0)
    # Each schedule's weight reads: lockstep two batches of 2 token steps at fixed r.
    assert rows[0]["passes"] == {"prelude": 4, "core": 16, "coda": 4}
    assert all(0 < r["schedule"] <= r["ceiling"] + 1e-9 for r in rows if r["variant"] != "full")
    # Prefills timed once per schedule: lockstep's two batches, continuous's refills.
    prefill = {r["variant"]: r["prefill_seconds"] for r in rows}
    assert prefill["full"] == prefill["exit"] != prefill["exit-continuous@0"]
    for row in rows:  # 6 prompts × 2 tokens after the first (no stop token)
        assert row["prefill_seconds"] > 0  # (timed apart: on a loaded host it may exceed a call)
        if row["seconds"] > row["prefill_seconds"]:
            assert np.isclose(row["decode_tokens_per_s"],
                              12 / (row["seconds"] - row["prefill_seconds"]))
        else:  # the load moved between the two timings: no rate rather than a wild one
            assert np.isnan(row["decode_tokens_per_s"])
    printed = capsys.readouterr().out
    assert "lockstep batch 3 r 4:" in printed and "continuous batch 3 r 4:" in printed
    median = {e["variant"]: e for e in report["median"]}
    assert median["exit"]["rounds"] == 2
    assert np.isclose(median["exit"]["conversion"],
                      np.median([r["conversion"] for r in rows if r["variant"] == "exit"]))
    assert "median over 2 rounds" in printed
    with pytest.raises(SystemExit):
        bench_sample.bench_cli(["tiny", "--variants", "exit-continuous@soon"])
    assert "unknown variant 'exit-continuous@soon'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_sample.bench_cli(["tiny", "--batches", "4", "--queue", "6"])
    assert "--queue 6 must be a multiple of every batch" in capsys.readouterr().err


def test_conversion_ceiling_counts_the_check_and_the_boundary_pass():
    from rdlm.generation import ExitConfig
    cfg = rdlm.model_preset("bench-28m")
    sizes = {k: sum(x.size for x in jax.tree.leaves(v))
             for k, v in rdlm.abstract_params(cfg).items()}
    # The coda pass reads the final norm and the head (the tied embedding) with the coda.
    core, coda = sizes["core"], sizes["coda"] + sizes["ln_f"] + sizes["wte"]
    assert bench_sample.pass_weights(cfg) == {"prelude": sizes["prelude"], "core": core,
                                              "coda": coda}
    boundary = sizes["prelude"] + coda
    # Without exits there is nothing to convert and nothing lost: 1.
    assert np.isclose(bench_sample.conversion_ceiling(cfg, ExitConfig("latent-diff"), 32, 32), 1)
    # A latent criterion loses only the boundary pass, which every token pays anyway.
    expected = (32 * core + boundary) / (10 * core + boundary) / 3.2
    assert np.isclose(bench_sample.conversion_ceiling(cfg, ExitConfig("latent-diff"), 32, 10),
                      expected)
    # KL checks the coda and head at every step (or every check_every-th); the exiting
    # check's coda is the token's.
    for every in (1, 4):
        expected = ((32 * core + boundary) / (10 * (core + coda / every) + sizes["prelude"])
                    / 3.2)
        assert np.isclose(bench_sample.conversion_ceiling(
            cfg, ExitConfig("kl", check_every=every), 32, 10), expected)
    assert bench_sample.conversion_ceiling(cfg, ExitConfig("kl"), 32, 10) < 0.62
    # Without prelude and coda layers (the demo's model) the head alone is the boundary pass.
    bare = dataclasses.replace(rdlm.model_preset("tiny"), n_prelude=0, n_coda=0)
    sizes = {k: sum(x.size for x in jax.tree.leaves(v))
             for k, v in rdlm.abstract_params(bare).items()}
    assert "prelude" not in sizes and "coda" not in sizes
    head = sizes["wte"] + sizes["ln_f"]
    expected = (32 * sizes["core"] + head) / (10 * sizes["core"] + head) / 3.2
    assert np.isclose(bench_sample.conversion_ceiling(bare, ExitConfig("latent-diff"), 32, 10),
                      expected)


def test_median_leaves_out_rounds_without_a_decoding_rate():
    rows = [{"variant": "exit", "batch": 2, "num_steps": 4, "mean_iterations": 2.0,
             "tokens_per_s": t, "decode_tokens_per_s": d}
            for t, d in ((1.0, 5.0), (2.0, float("nan")), (3.0, 7.0))]
    entry, = bench_sample.median_summary(rows)
    assert entry["tokens_per_s"] == 2.0 and entry["decode_tokens_per_s"] == 6.0


def test_schedule_conversion_counts_what_the_passes_read():
    """A schedule whose passes are the no-waste ones (T token steps of B rows, each row 10
    core steps) converts as the ceiling says; the same with idle rows (lockstep waiting for a
    row that ran 20) or an extra boundary pass per token step converts less."""
    from rdlm.generation import ExitConfig
    cfg = rdlm.model_preset("bench-28m")
    T, B = 31, 16
    full = {"prelude": T, "core": 32 * T, "coda": T}
    no_waste = {"prelude": T, "core": 10 * T, "coda": T}
    convert = lambda passes: bench_sample.schedule_conversion(cfg, passes, B * T, full, B * T,
                                                              32, 10.0)
    assert np.isclose(convert(no_waste),
                      bench_sample.conversion_ceiling(cfg, ExitConfig("latent-diff"), 32, 10))
    idle = {**no_waste, "core": 20 * T}
    extra = {"prelude": 2 * T, "core": 10 * T, "coda": 2 * T}
    assert convert(idle) < convert(extra) < convert(no_waste)
    w = bench_sample.pass_weights(cfg)
    assert np.isclose(convert(idle), (32 * w["core"] + w["prelude"] + w["coda"]) /
                      (20 * w["core"] + w["prelude"] + w["coda"]) / 3.2)


def test_bench_takes_prompts_from_a_task_checkpoints_problems(tmp_path, capsys):
    """The demo's kind of model is benchmarked on its own held-out problems."""
    config = rdlm.load_config("configs/tiny.yaml")
    cfg = config.model
    params = rdlm.init_params(cfg, jax.random.key(0))
    path = tmp_path / "ckpt"
    checkpoint.save_params(path, config, params)
    expected = bench_sample.task_tokens(config, 2 * 8)
    assert expected[0] == load_tokenizer(config.data.tokenizer).bos_id
    assert bench_sample.bench_prompts(cfg, 2, 8, None, expected) == \
        expected[:16].reshape(2, 8).tolist()
    out = tmp_path / "bench.json"
    assert bench_sample.bench_cli(["--checkpoint", str(path), "--task-prompts", "--steps", "2",
                                   "--batches", "2", "--prompt-len", "8", "--new-tokens", "2",
                                   "--variants", "full", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["prompts"] == "held-out problems of the checkpoint's task"
    with pytest.raises(SystemExit):
        bench_sample.bench_cli(["tiny", "--task-prompts"])
    assert "--task-prompts takes the task of --checkpoint" in capsys.readouterr().err
