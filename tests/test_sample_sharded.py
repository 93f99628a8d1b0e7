"""Sharded generation on 8 fake CPU devices gives exactly the single-device tokens, lockstep
(the batch and the params sharded) and depth-continuous (each data-parallel group its share of
the queue, the group's weights split over its "tensor" devices).

Runs in a subprocess: the device count is fixed when JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.multihost import xla_flags

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    import rdlm
    from rdlm.runtime import sharding
    from rdlm.config import MeshConfig
    from rdlm.generation import api
    from rdlm.generation.continuous import continuous_on_groups_jit
    from rdlm.generation.plan import continuous_plan, make_plan

    cfg = rdlm.model_preset("tiny")
    params = rdlm.init_params(cfg, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    prompts = [[5, 9, 13, 2, 40, 7], [33, 1, 8], [60, 61, 62, 63, 0, 12, 3], [4, 4]]
    options = [dict(speculative=rdlm.SpeculativeConfig(num_draft=2, draft_steps=1)),
               dict(exit="kl", cache_budget=2, continuous_cot=True)]
    for opts in options:
        single = rdlm.generate(params, cfg, prompts, max_new_tokens=6, num_steps=4, **opts)
        mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
        out = rdlm.generate(params, cfg, prompts, max_new_tokens=6, num_steps=4, mesh=mesh, **opts)
        np.testing.assert_array_equal(out.tokens, single.tokens)
        np.testing.assert_array_equal(out.steps, single.steps)
    # Over the mesh the Pallas kernels run per shard of it (rows over data × fsdp, heads over
    # tensor): traced for a TPU and run in Pallas' interpreter, splash over a 128-position
    # prefill and the row-entries kernel over every decoding step's cache, lockstep and inside
    # the depth-continuous groups of 2 "tensor" devices, give the single device's tokens and
    # logits.
    import contextlib, dataclasses, functools
    from rdlm.model import backend, kernels, pallas_attention, pallas_decode, row_cache
    long_cfg = dataclasses.replace(cfg, max_seq_len=256)
    long = dict(max_new_tokens=3, num_steps=3, prompt_len=128, return_logits=True)
    prompts8 = prompts + [p[::-1] + [17] for p in prompts]  # two rows on each shard
    single = rdlm.generate(params, long_cfg, prompts8, **long)
    single_rows = rdlm.generate(params, long_cfg, prompts8, continuous_batching=True,
                                batch_size=2, exit="kl", **long)
    @contextlib.contextmanager
    def patched(*changes):  # (module, name, value) each, for the block, traced afresh
        saved = [(module, name, getattr(module, name)) for module, name, _ in changes]
        for module, name, value in changes:
            setattr(module, name, value)
        jax.clear_caches()
        try:
            yield
        finally:
            for module, name, value in saved:
                setattr(module, name, value)
            jax.clear_caches()
    chosen, shards = [], []
    def spy(*args, **kwargs):
        chosen.append(choose(*args, **kwargs))
        return chosen[-1]
    def spy_rows(*args, **kwargs):
        chosen.append(choose_rows(*args, **kwargs))
        return chosen[-1]
    def per_shard(mesh, kernel, q, *args, **kwargs):
        shards.append(("whole", *q.shape[:2]))
        return rows_per_shard(mesh, kernel, q, *args, **kwargs)
    def interpreted(q, *args, **kwargs):
        shards.append(("shard", *q.shape[:2]))
        return rows_kernel(q, *args, interpret=True, **kwargs)
    choose, choose_rows = kernels.choose_attention, row_cache.choose_row_attention
    rows_kernel = pallas_decode.row_entries_attention
    rows_per_shard = pallas_decode.row_entries_attention_per_shard
    with patched((kernels, "choose_attention", spy), (row_cache, "choose_row_attention", spy_rows),
                 (backend, "target_platform", lambda: "tpu"),
                 (pallas_attention, "splash_attention", functools.partial(
                     pallas_attention.splash_attention, interpret=True)),
                 (pallas_decode, "row_entries_attention", interpreted),
                 (pallas_decode, "row_entries_attention_per_shard", per_shard)):
        out = rdlm.generate(params, long_cfg, prompts8, mesh=mesh, **long)
        lockstep_shards, shards = shards, []
        out_rows = rdlm.generate(params, long_cfg, prompts8, mesh=mesh, continuous_batching=True,
                                 batch_size=8, exit="kl", **long)
    assert set(chosen) == {kernels.SPLASH, kernels.CACHE, row_cache.ROWS_KERNEL}, chosen
    # (rows, KV heads): lockstep's 8 rows run on shards of 2 rows and half the heads; a
    # group's 2 rows (or the one of a gathered pass) on half the heads.
    assert set(lockstep_shards) == {("whole", 8, 4), ("shard", 2, 2)}, lockstep_shards
    assert set(shards) == {("whole", 2, 4), ("shard", 2, 2), ("whole", 1, 4),
                           ("shard", 1, 2)}, shards
    for got, want in ((out, single), (out_rows, single_rows)):
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_allclose(got.logits, want.logits, rtol=0, atol=1e-4)
    # Traced for a GPU, the groups run the Triton row-entries kernel per shard of "tensor".
    gpu_kernel, shards = pallas_decode.gpu_row_entries_attention, []
    def gpu_interpreted(q, *args, **kwargs):
        shards.append(("shard", *q.shape[:2]))
        return gpu_kernel(q, *args, interpret=True, **kwargs)
    with patched((backend, "target_platform", lambda: "gpu"),
                 (pallas_decode, "gpu_row_entries_attention", gpu_interpreted),
                 (pallas_decode, "row_entries_attention_per_shard", per_shard)):
        out_rows = rdlm.generate(params, long_cfg, prompts8, mesh=mesh, continuous_batching=True,
                                 batch_size=8, exit="kl", **long)
    assert ("shard", 2, 2) in shards and ("whole", 2, 4) in shards, shards
    np.testing.assert_array_equal(out_rows.tokens, single_rows.tokens)
    np.testing.assert_allclose(out_rows.logits, single_rows.logits, rtol=0, atol=1e-4)
    # Depth-continuous batching, 9 prompts against 2 rows on one device, greedy under KL exit
    # and sampled from random initial states (each prompt's numbers follow its index):
    # - on the same mesh, 4 data-parallel groups (data × fsdp) of 2 rows, each group's weights
    #   split over its 2 "tensor" devices: shares 3, 3, 3 and one empty;
    # - over 8 groups of one device, one row each: shares 2, 2, 2, 2, 1 and three empty.
    prompts9 = (prompts * 3)[:9]
    flat = sharding.make_mesh(MeshConfig(data=-1))
    # `generate` hands the group program weights placed by GROUP_RULES (split over "tensor"
    # only, whatever "fsdp" is): the program's own arguments, recorded on their way in.
    placed, run_groups = [], api.continuous_on_groups_jit
    def record(params, *args, **kwargs):
        placed.append([x.sharding.spec for x in jax.tree.leaves(params)])
        return run_groups(params, *args, **kwargs)
    api.continuous_on_groups_jit = record
    for opts in (dict(exit="kl", cache_budget=2),
                 dict(temperature=0.8, init_scale=1.0, key=jax.random.key(7))):
        common = dict(max_new_tokens=6, num_steps=4, continuous_batching=True, **opts)
        single = rdlm.generate(params, cfg, prompts9, batch_size=2, **common)
        for on, prefills in ((mesh, 3 * 2 + 1), (flat, 4 * 2 + 4)):
            out = rdlm.generate(params, cfg, prompts9, batch_size=8, mesh=on, **common)
            for name in ("tokens", "steps", "lengths"):
                np.testing.assert_array_equal(getattr(out, name), getattr(single, name))
            # A group stages as many prompts as it has rows (an empty queue stages its padding).
            assert out.stats["prefills"] == prefills, out.stats
    api.continuous_on_groups_jit = run_groups
    for on, specs in zip((mesh, flat, mesh, flat), placed):
        want = sharding.param_shardings(cfg, on, sharding.GROUP_RULES)
        assert specs == [x.spec for x in jax.tree.leaves(want)], specs
    assert any("fsdp" in str(x.spec) for x in jax.tree.leaves(sharding.param_shardings(cfg, mesh)))
    assert not any("fsdp" in str(spec) for spec in placed[0]) and len(placed) == 4
    try:  # rows that do not divide among the groups are refused, naming the groups
        rdlm.generate(params, cfg, prompts9, batch_size=6, mesh=mesh, **common)
        raise AssertionError("6 rows over 4 groups were accepted")
    except ValueError as err:
        assert "must divide among the mesh's 4 data-parallel groups" in str(err), err
    # A Pallas kernel may run as it is inside a group of one device, not where XLA partitions
    # the group's program over "tensor" (nor in a program over all 8 devices).
    from rdlm.model import backend
    seen = {}
    def probe(name, x):
        seen[name] = backend.runs_per_device()
        return x
    for name, on in (("groups of 2", mesh), ("groups of 1", flat)):
        manual = sharding.group_axes(on)  # as the depth-continuous program takes them
        spec = jax.sharding.PartitionSpec(sharding.data_axes())
        jax.jit(jax.shard_map(lambda x, name=name: probe(name, x), mesh=on, in_specs=spec,
                              out_specs=spec, axis_names=manual, check_vma=False))(np.zeros(8))
    jax.jit(lambda x: probe("all devices", x))(np.zeros(8))
    assert seen == {"groups of 2": False, "groups of 1": True, "all devices": False}, seen
    # Within a group the weights stay split: each tensor device holds half the heads and MLP
    # units, and the program sums their partial products across the group.
    plan = continuous_plan(make_plan(cfg, prompts9, max_new_tokens=6, num_steps=4, exit="kl",
                                     prompt_len=8), 3, 2, None)
    queues = [api._queue(plan, prompts9, share) for share in api.group_shares(9, 4)]
    split = jax.device_put(params, sharding.param_shardings(cfg, mesh, sharding.GROUP_RULES))
    compiled = continuous_on_groups_jit.lower(
        split, jax.tree.map(lambda *xs: np.stack(xs), *queues), np.int32(4), np.float32(1e-3),
        np.int32(0), jax.random.key(0), plan=plan, mesh=mesh).compile()
    whole = sum(x.nbytes for x in jax.tree.leaves(params))
    assert compiled.memory_analysis().argument_size_in_bytes < 0.75 * whole
    assert "all-reduce(" in compiled.as_text()
    # From the command line: `rdlm sample --mesh data=2,tensor=4 --continuous-batching`.
    import contextlib, io, json, tempfile
    from rdlm.cli import main
    from rdlm.runtime import checkpoint
    config = rdlm.load_config("configs/tiny.yaml")
    ckpt = tempfile.mkdtemp() + "/params"
    checkpoint.save_params(ckpt, config, params)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["sample", "--checkpoint", ckpt, "--mesh", "data=2,tensor=4", "--json",
                     "--continuous-batching", "--batch-size", "4", "--num-steps", "4",
                     "--max-new-tokens", "6", "--exit", "kl", "--cache-budget", "2",
                     *(f"--tokens={','.join(map(str, p))}" for p in prompts9)]) == 0
    single = rdlm.generate(params, cfg, prompts9, max_new_tokens=6, num_steps=4, exit="kl",
                           cache_budget=2, continuous_batching=True, batch_size=2)
    assert [json.loads(line)["tokens"] for line in printed.getvalue().splitlines()] == single.rows()
    # `rdlm eval --mesh`: task accuracy over the groups gives the single device's answers.
    from rdlm.generation.evaluate import evaluate_accuracy
    result = tempfile.mkdtemp() + "/eval.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["eval", "--checkpoint", ckpt, "--num-examples", "6", "--num-steps", "2",
                     "--continuous-batching", "--batch-size", "4", "--mesh", "data=2,tensor=4",
                     "--json", result]) == 0
    alone = evaluate_accuracy(params, config, num_steps_list=[2], num_examples=6, batch_size=2,
                              continuous_batching=True)
    assert json.load(open(result))["predictions"]["2"] == alone["predictions"][2]
    print("SHARDED-OK", jax.device_count())
""")


def test_sharded_generation_equals_single_device():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = xla_flags(8)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "SHARDED-OK 8" in result.stdout
