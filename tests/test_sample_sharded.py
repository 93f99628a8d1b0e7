"""Sharded generation on 8 fake CPU devices gives exactly the single-device tokens, lockstep
(the batch and the params sharded) and depth-continuous (each device its share of the queue).

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
    # Depth-continuous batching on the same mesh: 9 prompts over 8 devices of one row each
    # (shares 2, 2, 2, 2, 1 and three empty), against 2 rows on one device, greedy under KL
    # exit and sampled from random initial states (each prompt's numbers follow its index).
    prompts9 = (prompts * 3)[:9]
    for opts in (dict(exit="kl", cache_budget=2),
                 dict(temperature=0.8, init_scale=1.0, key=jax.random.key(7))):
        common = dict(max_new_tokens=6, num_steps=4, continuous_batching=True, **opts)
        single = rdlm.generate(params, cfg, prompts9, batch_size=2, **common)
        out = rdlm.generate(params, cfg, prompts9, batch_size=8, mesh=mesh, **common)
        for name in ("tokens", "steps", "lengths"):
            np.testing.assert_array_equal(getattr(out, name), getattr(single, name))
        # One row per device stages one prompt at a time: 2 prefills on each of the four
        # devices with two prompts, 1 on the others (an empty queue stages its padding).
        assert out.stats["prefills"] == 4 * 2 + 4
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
