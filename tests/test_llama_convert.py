"""Llama-family checkpoints into recurrent-depth models and back, against `transformers`' own
LlamaForCausalLM on small random weights (a test-only dependency): exact logits at r = 1, a
round trip that transformers reloads, the errors for bad input, and analyze-layers' numbers."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import rdlm  # noqa: E402
from rdlm.cli import main  # noqa: E402
from rdlm.interop import load_llama  # noqa: E402
from rdlm.runtime import checkpoint  # noqa: E402

VOCAB = 96
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=5,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=10_000.0, attention_bias=False,
            tie_word_embeddings=False)
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
CORPUS = ["the core block is iterated r times", "prelude then core then coda",
          "a recurrent depth model thinks longer not wider"] * 10


def write_tokenizer(path, added=0):
    """A small Metaspace BPE tokenizer.json (Llama-style specials) with fewer ids than VOCAB,
    plus ``added`` added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.add_tokens([f"<extra_{i}>" for i in range(added)])
    tok.save(str(path))
    return path


def hf_checkpoint(directory, seed=0, max_shard_size=None, tokenizer=True, **changes):
    """A random LlamaForCausalLM saved as safetensors (norms and biases moved off 1 and 0)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**BASE, **changes})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.15 * torch.randn_like(p))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    if tokenizer:
        write_tokenizer(directory / "tokenizer.json")
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
             "eos_token": "</s>", "chat_template": "{{ messages }}"}))
    return directory, model


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


CASES = {
    # GQA 4 → 2, untied head, llama3 scaling, q/k/v/o biases; coda of 2
    "gqa-untied-llama3-bias": (dict(attention_bias=True, rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), 1, 2, None),
    # one key/value head, tied head, linear scaling; no prelude
    "mqa-tied-linear": (dict(num_key_value_heads=1, tie_word_embeddings=True,
                             rope_scaling={"rope_type": "linear", "factor": 2.0}), 0, 3, None),
    # plain multi-head attention, tied, biases, no coda, sharded files
    "mha-tied-bias-sharded": (dict(num_key_value_heads=4, tie_word_embeddings=True,
                                   attention_bias=True), 2, 3, "20KB"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
    changes, prelude, core, shard = CASES[request.param]
    directory, model = hf_checkpoint(tmp_path_factory.mktemp(request.param), seed=len(changes),
                                     max_shard_size=shard, **changes)
    return request.param, directory, model, prelude, core


def test_r1_logits_equal_transformers(converted):
    name, directory, model, prelude, core = converted
    cfg, params = load_llama(directory, prelude=prelude, core=core)
    assert (cfg.n_prelude, cfg.n_core, cfg.n_coda) == (prelude, core, 5 - prelude - core)
    expected = torch_logits(model)
    # A random initial state: the [0; I] adapter never reads it.
    logits, _ = rdlm.forward(params, jnp.asarray(TOKENS), cfg, num_steps=1,
                             key=jax.random.key(3), init_scale=1.0)
    delta = float(np.abs(np.asarray(logits) - expected).max())
    print(f"\n{name}: max |Δlogits| at r=1 = {delta:.2e} (max |logit| "
          f"{np.abs(expected).max():.2f})")
    assert delta <= 1e-4
    # Until the adapter is trained every r computes the original network.
    more, _ = rdlm.forward(params, jnp.asarray(TOKENS), cfg, num_steps=3, init_scale=0.0)
    np.testing.assert_allclose(np.asarray(more), np.asarray(logits), atol=1e-5)


def test_cli_round_trip_reloads_in_transformers(tmp_path, capsys):
    changes, prelude, core, _ = CASES["gqa-untied-llama3-bias"]
    source, model = hf_checkpoint(tmp_path / "hf", seed=7, **changes)
    assert main(["convert", "llama-to-rdlm", str(source), str(tmp_path / "run"),
                 "--prelude", str(prelude), "--core", str(core)]) == 0
    assert "computes the original network" in capsys.readouterr().out
    config, _ = checkpoint.load_params(tmp_path / "run")
    assert config.data.tokenizer == str(tmp_path / "run" / "tokenizer.json")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(
        os.listdir(tmp_path / "run"))
    assert main(["convert", "rdlm-to-llama", str(tmp_path / "run"), str(tmp_path / "back"),
                 "--max-shard-size", "30KB"]) == 0
    back = tmp_path / "back"
    assert "model.safetensors.index.json" in os.listdir(back)
    # The tokenizer's own settings travel unchanged (its chat template included).
    assert json.loads((back / "tokenizer_config.json").read_text())["chat_template"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()),
                               sorted(reloaded.state_dict().items())):
        assert k == k2
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=k)
    np.testing.assert_array_equal(torch_logits(reloaded), torch_logits(model))


def test_sample_runs_on_the_converted_checkpoint(tmp_path, capsys):
    source, _ = hf_checkpoint(tmp_path / "hf", seed=1)
    assert main(["convert", "llama-to-rdlm", str(source), str(tmp_path / "run"),
                 "--prelude", "1", "--core", "2"]) == 0
    assert main(["sample", "--checkpoint", str(tmp_path / "run"), "--prompt", "the core",
                 "--max-new-tokens", "3", "--num-steps", "2"]) == 0
    assert "the core" in capsys.readouterr().out


def _assert_one_error(capsys, *fragments):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory.mktemp("good") / "hf", seed=2)[0]


def _edited_copy(good_dir, tmp_path, config_changes=None, drop=(), reshape=None, tokenizer=None):
    bad = tmp_path / "bad"
    shutil.copytree(good_dir, bad)
    if config_changes:
        config = json.loads((bad / "config.json").read_text())
        config.update(config_changes)
        (bad / "config.json").write_text(json.dumps(config))
    if drop or reshape:
        tensors = load_file(bad / "model.safetensors")
        for name in drop:
            del tensors[name]
        for name, value in (reshape or {}).items():
            tensors[name] = value
        save_file(tensors, bad / "model.safetensors")
    if tokenizer is not None:
        write_tokenizer(bad / "tokenizer.json", tokenizer)
    return bad


@pytest.mark.parametrize("edit, split, fragments", [
    (dict(drop=["model.layers.3.mlp.up_proj.weight"]), (1, 2),
     ["missing tensors: model.layers.3.mlp.up_proj.weight", "fetch every shard"]),
    (dict(reshape={"model.layers.2.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}),
     (1, 2), ["model.layers.2.self_attn.k_proj.weight has shape [8, 32]",
              "config.json implies [16, 32]"]),
    (dict(drop=["lm_head.weight"]), (1, 2), ["missing tensors: lm_head.weight",
                                             "tie_word_embeddings=false"]),
    (dict(), (3, 3), ["prelude 3 + core 3 = 6 layers, but the checkpoint has 5"]),
    (dict(), (-1, 2), ["prelude=-1 must be an integer >= 0"]),
    (dict(), (1, 0), ["core=0 must be an integer >= 1"]),
    (dict(config_changes={"rope_parameters": {"rope_type": "yarn", "factor": 2.0,
                                              "rope_theta": 10000.0}}), (1, 2),
     ["RoPE scaling type 'yarn' is not supported"]),
    (dict(config_changes={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}), (1, 2),
     ["architectures=['Qwen2ForCausalLM'] is not supported", "LlamaForCausalLM"]),
    (dict(config_changes={"hidden_act": "gelu", "mlp_bias": True, "head_dim": 16}), (1, 2),
     ["hidden_act='gelu'", "mlp_bias=True", "head_dim=16"]),
    (dict(config_changes={"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                          "sliding_window": 16}), (1, 2), ["sliding_window=16"]),
    (dict(tokenizer=VOCAB), (1, 2), ["tokenizer.json has", f"the embedding has {VOCAB} rows"]),
])
def test_bad_checkpoints_are_one_error_and_write_nothing(good_dir, tmp_path, capsys, edit, split,
                                                         fragments):
    bad = _edited_copy(good_dir, tmp_path, **edit)
    out = tmp_path / "out"
    assert main(["convert", "llama-to-rdlm", str(bad), str(out), "--prelude", str(split[0]),
                 "--core", str(split[1])]) == 2
    _assert_one_error(capsys, *fragments)
    assert not out.exists()


def test_mistral_without_window_converts(good_dir, tmp_path):
    bad = _edited_copy(good_dir, tmp_path, config_changes={
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None})
    cfg, _ = load_llama(bad, prelude=1, core=2)
    assert cfg.block == "llama" and cfg.n_coda == 2


def test_export_refuses_a_model_whose_adapter_reads_the_state(good_dir, tmp_path, capsys):
    cfg, params = load_llama(good_dir, prelude=1, core=2)
    params["core"]["adapter"] = params["core"]["adapter"].at[0, 0].set(0.5)
    checkpoint.save_params(tmp_path / "trained", rdlm.Config(model=cfg), params)
    assert main(["convert", "rdlm-to-llama", str(tmp_path / "trained"),
                 str(tmp_path / "out")]) == 2
    _assert_one_error(capsys, "no longer [0; I]", "max |state half| = 0.5",
                      "keep this one in rdlm's format")
    assert not (tmp_path / "out").exists()
    huginn_cfg = rdlm.model_preset("tiny")
    checkpoint.save_params(tmp_path / "huginn", rdlm.Config(model=huginn_cfg),
                           rdlm.init_params(huginn_cfg, jax.random.key(0)))
    assert main(["convert", "rdlm-to-llama", str(tmp_path / "huginn"), str(tmp_path / "o")]) == 2
    _assert_one_error(capsys, "model.block='huginn'", "rdlm-to-huginn")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# analyze-layers


def reference_influence(model, tokens):
    """Block influence straight from transformers: its hidden_states are the embeddings and each
    layer's input; the last layer's output (before the final norm) comes from a hook."""
    outputs = []
    hook = model.model.layers[-1].register_forward_hook(
        lambda mod, inp, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        states = list(model(torch.tensor([tokens]), output_hidden_states=True).hidden_states)
    hook.remove()
    h = [s[0].double().numpy() for s in states[:-1]] + [outputs[0][0].double().numpy()]
    cos = [np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
           for a, b in zip(h[:-1], h[1:])]
    return np.array([1 - c.mean() for c in cos]), h


def test_analyze_layers_matches_transformers_hidden_states(tmp_path, capsys):
    source, model = hf_checkpoint(tmp_path / "hf", seed=4, num_hidden_layers=6)
    (tmp_path / "text.txt").write_text(" ".join(CORPUS))
    out = tmp_path / "analysis"
    assert main(["analyze-layers", str(source), "--text", str(tmp_path / "text.txt"),
                 "--tokens", "40", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "layers.json").read_text())
    assert (out / "layers.png").stat().st_size > 0 and (out / "layers.txt").is_file()
    tok = rdlm.data.load_tokenizer(source)
    tokens = tok.prompt(" ".join(CORPUS))[:40]
    assert report["tokens"] == 40 and report["layers"] == 6
    expected, h = reference_influence(model, tokens)
    np.testing.assert_allclose(report["block_influence"], expected, atol=1e-5)
    # d(h_1, h_3): two layers on from layer 1.
    cos = np.sum(h[1] * h[3], -1) / np.linalg.norm(h[1], axis=-1) / np.linalg.norm(h[3], axis=-1)
    np.testing.assert_allclose(report["angular_distance"][1][1],
                               np.mean(np.arccos(np.clip(cos, -1, 1))) / np.pi, atol=1e-5)
    # The table prints every layer's influence and the split it suggests.
    for i, value in enumerate(expected):
        assert f"{i:>5}  {value:>9.4f}" in printed
    split = report["suggested_split"]
    assert split["prelude"] >= 1 and split["coda"] >= 1 and sum(
        split[k] for k in ("prelude", "core", "coda")) == 6
    assert f"--prelude {split['prelude']} --core {split['core']}" in printed


def test_analyze_layers_reads_a_long_text_in_context_windows(tmp_path):
    source, model = hf_checkpoint(tmp_path / "hf", seed=5, num_hidden_layers=3,
                                  max_position_embeddings=16)
    from rdlm.cli.analyze_layers import load_network
    from rdlm.interop.layer_analysis import analyze_layers
    cfg, params, _ = load_network(str(source))
    tokens = rdlm.data.load_tokenizer(source).prompt(" ".join(CORPUS))[:40]
    analysis = analyze_layers(params, cfg, tokens)
    assert analysis.tokens == 40 and cfg.max_seq_len == 16
    # Windows of 16, 16 and 8 tokens, each a text of its own: the influence averages over all.
    windows = [reference_influence(model, tokens[i:i + 16]) for i in (0, 16, 32)]
    weights = np.array([16, 16, 8]) / 40
    expected = sum(w * influence for w, (influence, _) in zip(weights, windows))
    np.testing.assert_allclose(analysis.influence, expected, atol=1e-5)


def test_suggested_split_rules():
    from rdlm.interop.layer_analysis import suggest_split

    influence = [0.9, 0.30, 0.05, 0.04, 0.06, 0.35, 0.04, 0.8]
    # Inner layers 1..6, median 0.055: the runs at or below it are [2, 3] and [6].
    assert suggest_split(influence)[0] == (2, 2, 4)
    assert suggest_split(influence, core=3)[0] == (2, 3, 3)
    assert suggest_split(influence, core=1)[0] == (3, 1, 4)
    assert suggest_split([0.5, 0.2])[0] == (0, 2, 0)
    with pytest.raises(rdlm.ConfigError, match="core=7 is invalid"):
        suggest_split(influence, core=7)


def test_analyze_layers_refuses_a_trained_adapter(good_dir, tmp_path, capsys):
    cfg, params = load_llama(good_dir, prelude=1, core=2)
    (tmp_path / "text.txt").write_text("the core block")
    checkpoint.save_params(tmp_path / "converted", rdlm.Config(model=cfg), params)
    shutil.copyfile(good_dir / "tokenizer.json", tmp_path / "converted" / "tokenizer.json")
    assert main(["analyze-layers", str(tmp_path / "converted"), "--text",
                 str(tmp_path / "text.txt"), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "layers.json").is_file()
    params["core"]["adapter"] = params["core"]["adapter"].at[3, 3].set(0.1)
    checkpoint.save_params(tmp_path / "trained", rdlm.Config(model=cfg), params)
    capsys.readouterr()
    assert main(["analyze-layers", str(tmp_path / "trained"), "--text",
                 str(tmp_path / "text.txt"), "--out", str(tmp_path / "b")]) == 2
    _assert_one_error(capsys, "not a fixed-depth network", "no longer [0; I]")
    assert not (tmp_path / "b").exists()


def test_transformers4_config_spelling_and_defaults():
    from rdlm.interop import config_from_llama

    # The keys of a Llama-3.1-style config.json as transformers 4 wrote them.
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
          "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
          "num_attention_heads": 8, "num_key_value_heads": 2, "rope_theta": 500000.0,
          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
          "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
          "pretraining_tp": 1, "torch_dtype": "bfloat16"}
    cfg = config_from_llama(hf, prelude=2, core=3, dtype="bfloat16")
    assert (cfg.rope_base, cfg.rope_scaling, cfg.rope_scaling_factor,
            cfg.rope_original_max_len) == (500000.0, "llama3", 8.0, 8192)
    assert (cfg.n_prelude, cfg.n_core, cfg.n_coda, cfg.kv_heads) == (2, 3, 1, 2)
    assert cfg.tie_embeddings and not cfg.attn_bias and cfg.adapter_init == "embedding"
    linear = config_from_llama({**hf, "rope_scaling": {"type": "linear", "factor": 2.0}},
                               prelude=0, core=6)
    assert (linear.rope_scaling, linear.rope_scaling_factor, linear.n_coda) == ("linear", 2.0, 0)
    with pytest.raises(rdlm.ConfigError, match="'dynamic' is not supported"):
        config_from_llama({**hf, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
                          prelude=0, core=6)


def test_bfloat16_parameters(good_dir):
    cfg, params = load_llama(good_dir, prelude=1, core=2, dtype="bfloat16",
                             compute_dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
