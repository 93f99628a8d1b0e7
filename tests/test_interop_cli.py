"""``python -m rdlm convert``: Hugging Face directory -> orbax checkpoint -> Hugging Face directory."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors import safe_open

import rdlm
from rdlm.runtime import checkpoint
from rdlm.cli import main
from rdlm.interop import load_huginn
from tests.test_interop_huginn import huginn_tensors, write_checkpoint
from tests.test_interop_tokenizer import SPECIALS, train_bpe


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("cli") / "hf", huginn_tensors(seed=3))


def test_round_trip_through_orbax(tmp_path, hf_dir, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    train_bpe(tok / "tokenizer.json", SPECIALS)
    for name in ("raven_config_minimal.py", "raven_modeling_minimal.py"):
        (tok / name).write_text("# the released modelling code\n")
    assert main(["convert", "huginn-to-rdlm", str(hf_dir), str(tmp_path / "ckpt")]) == 0
    config, params = checkpoint.load_params(tmp_path / "ckpt")
    cfg, reference = load_huginn(hf_dir)
    assert config.model == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)
    assert main(["convert", "rdlm-to-huginn", str(tmp_path / "ckpt"), str(tmp_path / "back"),
                 "--max-shard-size", "30KB", "--tokenizer", str(tok), "--code-from", str(tok)]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
            "raven_modeling_minimal.py"} <= set(os.listdir(tmp_path / "back"))
    generation = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert generation["bos_token_id"] == rdlm.data.load_tokenizer(tok).bos_id
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "back")
    auto_map = json.loads((tmp_path / "back" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "raven_config_minimal.RavenConfig"
    # The file written back holds the original tensors, bit for bit.
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    for name, value in huginn_tensors(seed=3).items():
        with safe_open(tmp_path / "back" / index["weight_map"][name], framework="numpy") as f:
            np.testing.assert_array_equal(f.get_tensor(name), value)
    assert "wrote" in capsys.readouterr().out


def test_relative_paths(tmp_path, hf_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(hf_dir, "hf")
    assert main(["convert", "huginn-to-rdlm", "hf", "ckpt"]) == 0
    assert main(["convert", "rdlm-to-huginn", "ckpt", "back", "--dtype", "bfloat16"]) == 0
    # No tokenizer kept with this checkpoint: the weights, the config and the model card.
    assert sorted(os.listdir("back")) == ["README.md", "config.json", "model.safetensors"]
    assert main(["convert", "rdlm-to-huginn", "ckpt", "hub", "--code-repo",
                 "tomg-group-umd/huginn-0125"]) == 0
    auto_map = json.loads(open("hub/config.json").read())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == (
        "tomg-group-umd/huginn-0125--raven_modeling_minimal.RavenForCausalLM")


def test_errors_are_one_message_and_write_nothing(tmp_path, hf_dir, capsys):
    broken = tmp_path / "broken"
    write_checkpoint(broken, {k: v for k, v in huginn_tensors().items() if "coda" not in k},
                     config=dict(json.loads((hf_dir / "config.json").read_text()),
                                 norm_class_name="LayerNorm"))
    assert main(["convert", "huginn-to-rdlm", str(broken), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "norm_class_name='LayerNorm'" in err and "missing tensors" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main(["convert", "rdlm-to-huginn", str(tmp_path / "nothing"), str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):
        main(["convert", "sideways", "a", "b"])
