"""Held-out loss at several r and latent-state telemetry, both jitted once (r is data)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from rdlm.config import Config
from rdlm.errors import ConfigError
from rdlm.model import forward, token_loss_sums
from rdlm.runtime import storage
from rdlm.train.step import Batch, global_batch


def make_eval_fn(cfg: Config, mesh: Mesh) -> Callable:
    """(params, batch, r) → (summed token loss, token count); one compilation for every r."""
    def eval_loss(params: Any, batch: Batch, num_steps: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits, _ = forward(params, batch["inputs"], cfg.model, num_steps=num_steps,
                            key=jax.random.key(cfg.seed + 1), segment_ids=batch.get("segment_ids"),
                            branch_ids=batch.get("branch_ids"))
        sums = token_loss_sums(logits, batch["targets"], batch.get("loss_mask"))
        return sums["nll"], sums["num_tokens"]
    return jax.jit(eval_loss)


def latent_telemetry(params: Any, tokens_bt: jax.Array, cfg: Config, num_steps: int
                     ) -> dict[str, jax.Array]:
    """Health of the recurrence (SPEC §1): convergence ‖s_k − s_{k−1}‖/‖s_k‖ at the last step and
    on average, ‖s_k‖ per token, and the mean cosine similarity between different tokens' final
    states (→ 1 means the states collapsed)."""
    _, aux = forward(params, tokens_bt, cfg.model, num_steps=num_steps,
                     key=jax.random.key(cfg.seed + 2), return_trajectory=True)
    traj_rbtd = aux["trajectory"].astype(jnp.float32)
    norm_rbt = jnp.linalg.norm(traj_rbtd, axis=-1)
    delta_rbt = jnp.linalg.norm(traj_rbtd[1:] - traj_rbtd[:-1], axis=-1) / (norm_rbt[1:] + 1e-9)
    final_btd = aux["state"].astype(jnp.float32)
    unit_btd = final_btd / (jnp.linalg.norm(final_btd, axis=-1, keepdims=True) + 1e-9)
    cos_btt = jnp.einsum("btd,bsd->bts", unit_btd, unit_btd)
    t = cos_btt.shape[-1]
    off_diag = (cos_btt.sum((-1, -2)) - jnp.trace(cos_btt, axis1=-2, axis2=-1)) / max(t * (t - 1), 1)
    return {"latent/rel_change_last": delta_rbt[-1].mean(),
            "latent/rel_change_mean": delta_rbt.mean(),
            "latent/state_norm": jnp.linalg.norm(final_btd, axis=-1).mean(),
            "latent/token_correlation": off_diag.mean()}



def mean_losses(eval_fn: Callable, params: Any, eval_batches: list[dict[str, np.ndarray]],
                cfg: Config, mesh: Mesh, steps: Sequence[int]) -> dict[int, float]:
    """``{r: mean token loss over eval_batches}`` for each r in ``steps``."""
    out = {}
    batches = [global_batch(b, cfg, mesh) for b in eval_batches]
    for r in steps:
        total = count = 0.0
        for b in batches:
            s, n = eval_fn(params, b, jnp.int32(r))
            total, count = total + float(s), count + float(n)
        out[int(r)] = total / max(count, 1.0)
    return out


def run_eval(eval_fn: Callable, params: Any, eval_batches: list[dict[str, np.ndarray]],
             cfg: Config, mesh: Mesh) -> dict[str, float]:
    """Mean token loss over ``eval_batches`` at each r in ``train.eval_steps``, as metrics."""
    losses = mean_losses(eval_fn, params, eval_batches, cfg, mesh, cfg.train.eval_steps)
    return {f"eval/loss_r{r}": v for r, v in losses.items()}


TOKEN_SOURCES = ("memmap", "arrayrecord", "parquet")  # data.source values that hold text
LOSS_STEPS = (1, 2, 4, 8, 16, 32, 64)  # the r of `rdlm eval`'s loss-vs-r table by default


def check_held_out(cfg: Config, split: str, allow_train_data: bool = False) -> list[str]:
    """The files of ``split``; `ConfigError` when they are the training files (``data.paths``
    without ``{split}``), unless ``allow_train_data``: a loss measured on what the model was
    trained on says nothing about held-out text."""
    from rdlm.data.sources import expand_paths  # the data layer loads grain: only when used
    files = expand_paths(cfg.data.paths, split)
    if not allow_train_data and split != "train" and files == expand_paths(cfg.data.paths, "train"):
        raise ConfigError(f"data.paths={list(cfg.data.paths)!r} gives the same files for split "
                          f"{split!r} as for training: put '{{split}}' in the paths (e.g. "
                          "data/{split}-*.npy, written by `rdlm prepare --prefix test`), or pass "
                          "--allow-train-data to measure the training loss on purpose.")
    return files


def _every_process(count: int) -> np.ndarray:
    """``count`` of every process, in process order."""
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.int64(count)))


def held_out_loss(params: Any, cfg: Config, *, num_steps_list: Sequence[int] = LOSS_STEPS,
                  split: str = "test", num_batches: int = 8, allow_train_data: bool = False,
                  mesh: Mesh | None = None) -> dict[str, Any]:
    """Mean token loss and perplexity of ``split`` at each r: the loss-vs-r curve of a text
    model. The same batches (``train.batch_size`` × ``train.seq_len`` tokens, in file order; at
    most ``num_batches``, each token read once) for every r; one compilation serves every r."""
    from rdlm.data import make_eval_batches
    from rdlm.runtime.sharding import make_mesh, param_shardings
    if cfg.data.source not in TOKEN_SOURCES:
        raise ConfigError(f"held-out loss needs token data (data.source in {TOKEN_SOURCES}); this "
                          f"run trained on data.source={cfg.data.source!r}: use its task "
                          "accuracy (`rdlm eval --task …`) instead.")
    check_held_out(cfg, split, allow_train_data)
    mesh = mesh or make_mesh(cfg.mesh)
    params = jax.device_put(params, param_shardings(cfg.model, mesh))  # as training laid them out
    # Over several hosts each process reads its rows of every batch, as in training.
    batches = make_eval_batches(cfg, num_batches=num_batches, split=split, repeat=False,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())
    hosts = jax.process_count() > 1
    if hosts:  # every process runs as many batches: one collective each
        batches = batches[:int(_every_process(len(batches)).min())]
    tokens = int(sum(np.asarray(b.get("loss_mask", np.ones_like(b["targets"]))).sum()
                     for b in batches))
    tokens = int(_every_process(tokens).sum()) if hosts else tokens
    loss = mean_losses(make_eval_fn(cfg, mesh), params, batches, cfg, mesh, num_steps_list)
    return {"split": split, "tokens": tokens, "num_batches": num_batches,
            "loss": loss, "perplexity": {r: math.exp(min(v, 700.0)) for r, v in loss.items()}}


def loss_table(result: dict[str, Any]) -> str:
    """Markdown table of `held_out_loss`: r, loss, perplexity."""
    lines = ["| r | loss | perplexity |", "|---:|---:|---:|"]
    lines += [f"| {r} | {loss:.4f} | {result['perplexity'][r]:.2f} |"
              for r, loss in result["loss"].items()]
    return "\n".join(lines)


def plot_loss_vs_r(result: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Held-out loss against r (log-2 axis), as a PNG at ``path`` (a file or a bucket URL)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rs = list(result["loss"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(rs, [result["loss"][r] for r in rs], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("recurrence steps r")
    ax.set_ylabel(f"{result['split']} loss (nats/token)")
    ax.set_title(title or f"held-out loss vs r ({result['tokens']:,} tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with storage.as_path(path).open("wb") as f:  # matplotlib cannot write to a bucket by name
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
