"""A researcher's own text, end to end through the command line: prepare (a BPE trained on the
corpus, held-out documents) → train → held-out loss vs r → text sampling → Hugging Face export and
back, with the tokenizer travelling with the run. Then the bad inputs of that path."""

from __future__ import annotations

import json
import pydoc
from pathlib import Path

import jax
import numpy as np
import pytest

import rdlm
from rdlm.cli import main
from rdlm.data import make_eval_batches
from rdlm.data.tokenizer import load_tokenizer
from rdlm.runtime import checkpoint


def corpus(path: Path) -> Path:
    """Text that every Python has: a few standard-library pages as pydoc renders them."""
    pages = [pydoc.render_doc(m, renderer=pydoc.plaintext) for m in ("bisect", "heapq", "shlex")]
    path.write_text("\n\n".join(pages))
    return path


def train_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "configs/tiny.yaml", "data.source=memmap", f"data.paths={data}/{{split}}-*.npy",
            f"data.tokenizer={data}/tokenizer.json", "model.vocab_size=320", "train.steps=2",
            "train.batch_size=2", "train.seq_len=32", "model.max_seq_len=64",
            "train.eval_every=0", "train.telemetry_every=0", "train.async_checkpoint=false",
            "train.progress=lines", f"train.run_dir={run}", *extra]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    data, run = root / "data", root / "run"
    assert main(["prepare", "--tokenizer", "bpe:300", "--test-fraction", "0.3", "--output",
                 str(data), str(corpus(root / "corpus.txt"))]) == 0
    assert main(train_args(data, run)) == 0
    return data, run


def test_the_run_keeps_its_config_and_tokenizer(text_run):
    data, run = text_run
    assert (run / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    saved = rdlm.load_config(run / "config.yaml")
    assert saved.data.tokenizer == f"{data}/tokenizer.json" and saved.train.steps == 2
    # prepare puts the BOS in front of every document, as generation puts it before a prompt.
    tok = load_tokenizer(data / "tokenizer.json")
    stream = np.load(data / "test-00000.npy")
    assert stream[0] == tok.bos_id and tok.eos_id in stream
    assert np.all(stream[np.flatnonzero(stream == tok.eos_id)[:-1] + 1] == tok.bos_id)


def test_eval_reports_held_out_loss_vs_r(text_run, tmp_path, capsys):
    data, run = text_run
    out = tmp_path / "loss.json"
    assert main(["eval", "--checkpoint", str(run), "--num-steps", "1,3", "--json", str(out),
                 "--plot", str(tmp_path / "loss.png")]) == 0
    assert "| 3 |" in capsys.readouterr().out and (tmp_path / "loss.png").stat().st_size > 0
    result = json.loads(out.read_text())
    cfg, params = checkpoint.load_params(run)
    batches = make_eval_batches(cfg, num_batches=8, split="test", repeat=False)
    for r in (1, 3):  # the mean next-token loss of the held-out split, computed directly
        nll = count = 0.0
        for b in batches:
            logits, _ = rdlm.forward(params, b["inputs"], cfg.model, num_steps=r,
                                     key=jax.random.key(cfg.seed + 1))
            logp = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
            picked = np.take_along_axis(np.asarray(logp), b["targets"][..., None], -1)[..., 0]
            mask = b.get("loss_mask", np.ones_like(b["targets"]))
            nll, count = nll - float((picked * mask).sum()), count + float(mask.sum())
        assert result["loss"][str(r)] == pytest.approx(nll / count, rel=1e-4)
        assert result["perplexity"][str(r)] == pytest.approx(np.exp(nll / count), rel=1e-3)


def test_sample_and_export_find_the_tokenizer_themselves(text_run, tmp_path, capsys):
    data, run = text_run
    assert main(["sample", "--checkpoint", str(run), "--prompt", "Return the", "--num-steps", "2",
                 "--max-new-tokens", "6", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    cfg, params = checkpoint.load_params(run)
    tok = load_tokenizer(data / "tokenizer.json")
    expected = rdlm.generate(params, cfg.model, ["Return the"], tokenizer=tok, num_steps=2,
                             max_new_tokens=6)
    assert record["tokens"] == expected.rows()[0] and record["text"] == expected.texts[0]
    assert record["prompt"] == "Return the"

    hf = tmp_path / "hf"
    assert main(["convert", "rdlm-to-huginn", str(run), str(hf)]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
            "config.json", "model.safetensors"} <= {p.name for p in hf.iterdir()}
    assert json.loads((hf / "generation_config.json").read_text()) == {
        "bos_token_id": tok.bos_id, "pad_token_id": tok.pad_id, "eos_token_id": tok.eos_id}
    assert json.loads((hf / "tokenizer_config.json").read_text())["bos_token"] == "<|begin_text|>"
    assert "2 steps" in (hf / "README.md").read_text()
    back = tmp_path / "back"
    assert main(["convert", "huginn-to-rdlm", str(hf), str(back)]) == 0
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(back), "--prompt", "Return the", "--num-steps",
                 "2", "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == record["tokens"]


def test_bad_input_on_the_text_path(text_run, tmp_path, capsys):
    data, run = text_run

    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        lines = capsys.readouterr().err.splitlines()
        # A "loaded step N from …" line may come first; the error is the one last line.
        assert lines[-1].startswith("error: ") and "Traceback" not in "\n".join(lines)
        assert all(line.startswith("loaded step") for line in lines[:-1]), lines
        return lines[-1]

    assert "a reasoning task needs a model trained on one" in error(
        ["eval", "--checkpoint", str(run), "--task", "chains"])
    assert "--num-steps=0 is invalid: must be an integer in [1, 1024]" in error(
        ["eval", "--checkpoint", str(run), "--num-steps", "0"])
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "no documents in" in error(["prepare", "--tokenizer", "chars", "--output",
                                       str(tmp_path / "p"), str(tmp_path / "empty.txt")])
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    assert "latin.txt' is not UTF-8 text (line 1" in error(
        ["prepare", "--tokenizer", "chars", "--output", str(tmp_path / "p"),
         str(tmp_path / "latin.txt")])
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": oops}\n')
    assert "bad.jsonl:2: invalid JSON" in error(
        ["prepare", "--tokenizer", "chars", "--output", str(tmp_path / "p"),
         str(tmp_path / "bad.jsonl")])
    assert "tokenizer has 300 tokens; set model.vocab_size >= 300" in error(
        train_args(data, tmp_path / "small", "model.vocab_size=64"))
    assert "data.tokenizer" in error(train_args(data, tmp_path / "none",
                                                f"data.tokenizer={tmp_path}/absent.json"))
    assert "train.lr=inf is invalid: expected a finite number" in error(
        train_args(data, tmp_path / "inf", "train.lr=.inf"))
    (tmp_path / "afile").write_text("")
    assert "is a file" in error(train_args(data, tmp_path / "afile"))
    # Paths without {split} would evaluate on the training files: refused unless asked for.
    same = tmp_path / "same"
    assert main(train_args(data, same, f"data.paths={data}/train-*.npy",
                           "train.steps=1")) == 0
    capsys.readouterr()
    assert "--allow-train-data" in error(["eval", "--checkpoint", str(same), "--num-steps", "1"])
    assert main(["eval", "--checkpoint", str(same), "--num-steps", "1",
                 "--allow-train-data"]) == 0
