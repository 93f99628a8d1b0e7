"""Huginn-0125 checkpoint interop: a tiny checkpoint in the exact Hugging Face layout, written here
with random weights, must load into params whose logits equal an independent NumPy forward pass
over the Hugging Face tensors (tests/huginn_reference.py)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import rdlm
from rdlm.interop import HuginnFormatError, huginn, load_huginn, save_huginn
from tests import huginn_reference
from tests.multihost import xla_flags

D, H, M, V, T = 32, 4, 48, 96, 32
LAYERS = {"prelude": 1, "core_block": 2, "coda": 1}

# The released config.json of Huginn-0125 (values as published), extra Hugging Face keys included.
HUGINN_0125_CONFIG = {
    "activation_checkpoint_impl": "per-iteration", "architecture_class_name": "RecurrentGPT",
    "architectures": ["RavenForCausalLM"],
    "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                 "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
    "bias": False, "block_class_name": "SandwichBlock", "block_size": 4096,
    "effective_expected_depth": 132, "head_dim": 96, "init_orthogonal": False,
    "init_strategy": "takase",
    "init_values": {"embed_scale": 72.6636084983398, "embedding": 0.008703882797784892,
                    "out_proj": 0.0005356869554443541, "std": 0.008703882797784892},
    "injection_type": "linear", "intermediate_size": 17920, "mean_backprop_depth": 8,
    "mean_recurrence": 32, "mlp_class_name": "GatedMLP", "model_type": "huginn_raven",
    "n_embd": 5280, "n_heads": 55, "n_layers": 8, "n_layers_in_coda": 2, "n_layers_in_prelude": 2,
    "n_layers_in_recurrent_block": 4, "nonlin_name": "SiLU", "norm_class_name": "RMSNorm_llama",
    "norm_eps": 1e-06, "num_key_value_heads": 55, "padded_vocab_size": 65536,
    "padding_multiple": 4096, "qk_bias": True, "rope_base": 50000,
    "sampling_scheme": "poisson-lognormal-filling", "state_init": "like-init",
    "tie_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.47.1",
    "vocab_size": 65536,
}


def tiny_config(**changes):
    cfg = dict(HUGINN_0125_CONFIG, n_embd=D, n_heads=H, head_dim=D // H, num_key_value_heads=H,
               intermediate_size=M, vocab_size=V, padded_vocab_size=V, block_size=T,
               n_layers_in_prelude=LAYERS["prelude"],
               n_layers_in_recurrent_block=LAYERS["core_block"], n_layers_in_coda=LAYERS["coda"],
               n_layers=sum(LAYERS.values()), mean_recurrence=4, mean_backprop_depth=2,
               effective_expected_depth=2 + 4 * 2, torch_dtype="float32")
    cfg["init_values"] = {"embed_scale": D ** 0.5, "std": (2 / (5 * D)) ** 0.5,
                          "embedding": (2 / (5 * D)) ** 0.5, "out_proj": 0.001}
    cfg.update(changes)
    return cfg


def huginn_tensors(seed=0):
    """Random weights under the PyTorch model's state-dict names and [out, in] shapes, built from
    the layout in SPEC (not from rdlm's key map), with non-trivial norms and q/k biases."""
    rng = np.random.default_rng(seed)

    def mat(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    t = {"transformer.wte.weight": (0.5 * rng.standard_normal((V, D))).astype(np.float32),
         "transformer.adapter.weight": mat(D, 2 * D),
         "transformer.ln_f.weight": (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)}
    for stack, n in LAYERS.items():
        for i in range(n):
            pre = f"transformer.{stack}.{i}."
            for k in range(1, 5):
                t[pre + f"norm_{k}.weight"] = (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)
            t[pre + "attn.Wqkv.weight"] = mat(3 * D, D)
            t[pre + "attn.qk_bias"] = (0.3 * rng.standard_normal((2, 1, H, D // H))).astype(np.float32)
            t[pre + "attn.proj.weight"] = mat(D, D)
            t[pre + "mlp.fc.weight"] = mat(2 * M, D)
            t[pre + "mlp.proj.weight"] = mat(D, M)
    return t


def rope_buffer():
    inv = 1.0 / (50000.0 ** (np.arange(0, D // H, 2, dtype=np.float32) / (D // H)))
    ang = np.outer(np.arange(T, dtype=np.float32), inv)
    return np.stack([np.cos(ang), np.sin(ang)], -1)[None, :, None].astype(np.float32)


def write_checkpoint(path, tensors, config=None, shards=1):
    """A Hugging Face-style directory: config.json plus one file or `shards` files with an index."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(tiny_config() if config is None else config, f)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for s, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[i]: tensors[names[i]] for i in chunk}, os.path.join(path, file),
                  metadata={"format": "pt"})
        weight_map.update({names[i]: file for i in chunk})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return path


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def tensors():
    return huginn_tensors()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tensors):
    return write_checkpoint(tmp_path_factory.mktemp("huginn") / "single", tensors)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_huginn(checkpoint)


def test_config_maps_to_model_config(loaded):
    cfg, params = loaded
    assert (cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.mlp_dim) == (V, D, H, M)
    assert (cfg.n_prelude, cfg.n_core, cfg.n_coda, cfg.max_seq_len) == (1, 2, 1, T)
    assert (cfg.mean_recurrence, cfg.backprop_depth, cfg.qk_bias) == (4, 2, True)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert jax.tree.structure(params) == jax.tree.structure(rdlm.abstract_params(cfg))


def test_released_config_is_the_huginn_preset():
    cfg = huginn.config_from_huginn(HUGINN_0125_CONFIG, dtype="bfloat16")
    assert cfg == rdlm.model_preset("huginn-3.5b")
    # What save_huginn writes reads back as the same model, and the key map covers 3.56 B params.
    assert huginn.config_from_huginn(huginn.huginn_config(cfg), dtype="bfloat16") == cfg
    entries, _ = huginn.key_map(cfg)
    assert sum(int(np.prod(e.hf_shape)) for e in entries) == 3_564_976_800
    assert len(entries) == 2 + 1 + 8 * 9


def test_logits_match_numpy_reference_over_hf_tensors(loaded, tensors):
    cfg, params = loaded
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, V)
    logits, _ = rdlm.forward(params, tokens, cfg, num_steps=4, init_scale=0.0)
    worst = 0.0
    for row in range(2):
        ref = huginn_reference.forward(tensors, tiny_config(), np.asarray(tokens[row]), num_steps=4)
        np.testing.assert_allclose(logits[row], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        worst = max(worst, float(np.abs(logits[row] - ref).max() / np.abs(ref).max()))
    assert worst < 1e-5, worst


def test_load_save_load_is_exact(tmp_path, loaded, tensors):
    cfg, params = loaded
    out = save_huginn(cfg, params, tmp_path / "saved")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    cfg2, params2 = load_huginn(out)
    assert cfg2 == cfg
    assert_trees_equal(params, params2)
    # The written tensors are the original Hugging Face tensors, bit for bit.
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors) | {"freqs_cis"}
        for name, value in tensors.items():
            np.testing.assert_array_equal(f.get_tensor(name), value)
        np.testing.assert_allclose(f.get_tensor("freqs_cis"), rope_buffer(), rtol=1e-6, atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    spec_keys = ["n_embd", "n_heads", "n_layers", "n_layers_in_prelude",
                 "n_layers_in_recurrent_block", "n_layers_in_coda", "intermediate_size",
                 "vocab_size", "block_size", "rope_base", "norm_eps", "qk_bias", "tie_embeddings",
                 "mean_recurrence", "mean_backprop_depth"]
    assert all(k in config for k in spec_keys)
    assert config["architectures"] == ["RavenForCausalLM"] and config["model_type"] == "huginn_raven"
    assert config["auto_map"]["AutoModelForCausalLM"].endswith(
        "raven_modeling_minimal.RavenForCausalLM")
    # The original config class passes these itself; repeating them in config.json breaks it.
    assert not {"tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id"} & set(config)
    # Every key of the released config.json is written, with the same meaning.
    assert set(HUGINN_0125_CONFIG) - set(config) <= {"padding_multiple", "transformers_version"}


def test_sharded_and_single_file_agree(tmp_path, loaded, tensors):
    cfg, params = loaded
    sharded = write_checkpoint(tmp_path / "sharded", tensors, shards=3)
    assert_trees_equal(params, load_huginn(sharded)[1])
    # save_huginn shards above max_shard_size and writes the index.
    out = save_huginn(cfg, params, tmp_path / "resharded", max_shard_size="40KB")
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1 and shard_files == [f for f in files if f.startswith("model-")]
    assert shard_files[0].endswith(f"-of-{len(shard_files):05d}.safetensors")
    assert index["metadata"]["total_size"] == sum(
        v.nbytes for v in tensors.values()) + rope_buffer().nbytes
    assert_trees_equal(params, load_huginn(out)[1])


def test_lm_head_present_tied_and_buffer_ignored(tmp_path, loaded, tensors):
    with_head = dict(tensors, **{"lm_head.weight": tensors["transformer.wte.weight"].copy(),
                                 "freqs_cis": rope_buffer()})
    assert_trees_equal(loaded[1], load_huginn(write_checkpoint(tmp_path / "head", with_head))[1])
    untied = dict(with_head, **{"lm_head.weight": with_head["lm_head.weight"] + 1e-3})
    untied["transformer.ln_f.weight"] = np.zeros(3, np.float32)
    with pytest.raises(HuginnFormatError, match="lm_head.weight differs") as err:
        load_huginn(write_checkpoint(tmp_path / "untied", untied))
    assert "transformer.ln_f.weight has shape [3]" in str(err.value)
    # A file that kept only the head's name for the tied matrix loads the same.
    only_head = {k: v for k, v in with_head.items() if k != "transformer.wte.weight"}
    assert_trees_equal(loaded[1], load_huginn(write_checkpoint(tmp_path / "only_head", only_head))[1])
    # save_huginn can write the tied head as a second copy (as the released files do).
    out = save_huginn(loaded[0], loaded[1], tmp_path / "saved_head", include_lm_head=True)
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("lm_head.weight"),
                                      tensors["transformer.wte.weight"])


@pytest.mark.parametrize("file_dtype", [ml_dtypes.bfloat16, np.float16])
def test_half_precision_files_load_as_float32(tmp_path, tensors, file_dtype):
    half = {k: v.astype(file_dtype) for k, v in tensors.items()}
    cfg, params = load_huginn(write_checkpoint(tmp_path / "half", half))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    np.testing.assert_array_equal(params["core"]["adapter"],
                                  half["transformer.adapter.weight"].astype(np.float32).T)
    # Parameters may be kept in bfloat16 instead (half the memory).
    _, params16 = load_huginn(tmp_path / "half", dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    # Saving in bfloat16 writes what the released checkpoint holds.
    out = save_huginn(cfg, params, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("transformer.wte.weight").get_dtype() == "BF16"
        if file_dtype is ml_dtypes.bfloat16:
            np.testing.assert_array_equal(f.get_tensor("transformer.wte.weight"),
                                          half["transformer.wte.weight"])


def test_every_problem_is_reported_in_one_message(tmp_path, tensors):
    broken = dict(tensors)
    del broken["transformer.core_block.1.mlp.proj.weight"]
    broken["transformer.core_block.7.attn.proj.weight"] = np.zeros((D, D), np.float32)
    broken["transformer.coda.0.mlp.fc.weight"] = np.zeros((M, D), np.float32)
    config = tiny_config(architectures=["LlamaForCausalLM"])
    with pytest.raises(HuginnFormatError) as err:
        load_huginn(write_checkpoint(tmp_path / "broken", broken, config))
    message = str(err.value)
    assert "architectures=['LlamaForCausalLM'] is unknown" in message
    assert "missing tensors: transformer.core_block.1.mlp.proj.weight" in message
    assert "unexpected tensors" in message and "transformer.core_block.7.attn.proj.weight" in message
    assert f"transformer.coda.0.mlp.fc.weight has shape [{M}, {D}]" in message
    assert f"config.json implies [{2 * M}, {D}]" in message
    assert len(err.value.problems) == 4


@pytest.mark.parametrize("key,value,needle", [
    ("norm_class_name", "LayerNorm", "norm_class_name='LayerNorm'"),
    ("injection_type", "add", "injection_type='add'"),
    ("block_class_name", "TransformerPreNormBlock", "block_class_name"),
    ("tie_embeddings", False, "tie_embeddings=False"),
    ("num_key_value_heads", 2, "grouped-query attention"),
    ("model_type", "llama", "model_type='llama'"),
    ("init_values", {"embed_scale": 1.0}, "init_values.embed_scale=1.0"),
    ("n_layers", 9, "n_layers=9"),
])
def test_config_keys_that_change_the_maths_are_refused(key, value, needle):
    with pytest.raises(HuginnFormatError, match="problem") as err:
        huginn.config_from_huginn(tiny_config(**{key: value}))
    assert needle in str(err.value)


def test_harmless_extra_keys_are_ignored():
    extra = tiny_config(torch_dtype="bfloat16", transformers_version="9.9", use_cache=True,
                        bos_token_id=65504, _name_or_path="x", sampling_scheme=None)
    extra.pop("sampling_scheme")
    assert huginn.config_from_huginn(extra) == huginn.config_from_huginn(tiny_config())
    minimal = {k: tiny_config()[k] for k in ("architectures", "n_embd", "n_heads",
                                            "intermediate_size", "vocab_size",
                                            "n_layers_in_prelude", "n_layers_in_recurrent_block",
                                            "n_layers_in_coda")}
    cfg = huginn.config_from_huginn(minimal)
    assert (cfg.max_seq_len, cfg.mean_recurrence, cfg.backprop_depth) == (4096, 32, 8)


def test_missing_files_and_missing_config_keys(tmp_path, tensors):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HuginnFormatError) as err:
        load_huginn(empty)
    assert "config.json" in str(err.value) and "no model.safetensors" in str(err.value)
    with pytest.raises(HuginnFormatError, match="not a directory"):
        load_huginn(tmp_path / "nowhere")
    config = tiny_config()
    del config["n_embd"]
    with pytest.raises(HuginnFormatError, match="lacks 'n_embd'"):
        load_huginn(write_checkpoint(tmp_path / "nokey", tensors, config))
    sharded = write_checkpoint(tmp_path / "lostshard", tensors, shards=2)
    os.remove(sharded / "model-00002-of-00002.safetensors")
    with pytest.raises(HuginnFormatError, match="lists 'model-00002-of-00002.safetensors', which "
                                                "does not exist"):
        load_huginn(sharded)


class _UnreadableLeaf:
    """A params leaf of the right shape whose values cannot be read: the save fails mid-file,
    after earlier tensors were written (as a full disk or a lost device would)."""

    def __init__(self, shape):
        self.shape = shape

    def __array__(self, dtype=None, copy=None):
        raise OSError("disk full")


def test_save_is_atomic(tmp_path, loaded):
    cfg, params = loaded
    target = tmp_path / "out"
    save_huginn(cfg, params, target)
    with pytest.raises(FileExistsError):
        save_huginn(cfg, params, target)
    before = (target / "model.safetensors").read_bytes()

    broken = {**params, "ln_f": {"weight": _UnreadableLeaf(params["ln_f"]["weight"].shape)}}
    with pytest.raises(OSError, match="disk full"):
        save_huginn(cfg, broken, tmp_path / "fresh")
    with pytest.raises(OSError, match="disk full"):
        save_huginn(cfg, broken, target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no partial or temporary directories
    assert (target / "model.safetensors").read_bytes() == before
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    save_huginn(bf16, params, target, overwrite=True, dtype="bfloat16")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (target / "model.safetensors").read_bytes() != before


def test_save_rejects_params_that_disagree_with_the_config(tmp_path, loaded):
    cfg, params = loaded
    bigger = dataclasses.replace(cfg, mlp_dim=2 * M)
    with pytest.raises(HuginnFormatError, match="mlp/fc has shape"):
        save_huginn(bigger, params, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_tensors_land_in_the_given_shardings(checkpoint, loaded):
    cfg, params = loaded
    mesh = jax.make_mesh((1,), ("data",))
    one = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: one, rdlm.abstract_params(cfg))
    _, placed = load_huginn(checkpoint, shardings=shardings)
    assert all(x.sharding == one for x in jax.tree.leaves(placed))
    assert_trees_equal(params, placed)
    with pytest.raises(ValueError, match="mirror the params"):
        load_huginn(checkpoint, shardings={"wte": one})


def test_mesh_uses_the_library_param_shardings(checkpoint, loaded):
    sharding = pytest.importorskip("rdlm.runtime.sharding")
    cfg, params = loaded
    mesh = sharding.make_mesh(rdlm.MeshConfig())
    _, placed = load_huginn(checkpoint, mesh=mesh)
    expected = sharding.param_shardings(cfg, mesh)
    for x, s in zip(jax.tree.leaves(placed), jax.tree.leaves(expected)):
        assert x.sharding == s
    assert_trees_equal(params, placed)


_SHARDED_LOAD = """
import sys, numpy as np, jax, rdlm
from rdlm.runtime import sharding
from rdlm.interop import load_huginn
mesh = sharding.make_mesh(rdlm.MeshConfig(data=1, fsdp=4, tensor=2))
cfg, placed = load_huginn(sys.argv[1], mesh=mesh)
_, plain = load_huginn(sys.argv[1])
split = 0
for x, y, s in zip(jax.tree.leaves(placed), jax.tree.leaves(plain),
                   jax.tree.leaves(sharding.param_shardings(cfg, mesh))):
    assert x.sharding == s, (x.sharding, s)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    split += x.addressable_shards[0].data.size < x.size
tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
a, _ = jax.jit(rdlm.forward, static_argnames=("cfg",))(placed, tokens, cfg, num_steps=2, init_scale=0.0)
b, _ = rdlm.forward(plain, tokens, cfg, num_steps=2, init_scale=0.0)
# Per-device shapes change XLA:CPU's kernel choices and float32 summation order (~1e-5 here); a
# wrong sharding changes logits by O(1).
np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
print("split", split, "of", len(jax.tree.leaves(placed)))
"""


def test_load_onto_an_eight_device_mesh(checkpoint):
    """Each tensor goes straight into its (fsdp x tensor) sharding; values and logits unchanged."""
    import subprocess
    import sys
    pytest.importorskip("rdlm.runtime.sharding")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, str(checkpoint)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    split = int(done.stdout.split()[1])
    assert split >= 4 * 4 + 2, done.stdout  # every matrix (and wte) is split across devices
