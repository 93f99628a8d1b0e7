"""E7 — latent trajectories: PCA paths of the state per token, the convergence heat map
‖s_i − s*‖ / ‖s*‖ over positions and steps, and path independence across initial states.

    python experiments/e7_latent_trajectories.py
    python experiments/e7_latent_trajectories.py --smoke

Uses the shared recurrent run; s* is the state after R = 64 steps, states are after the final
norm (what the coda reads).
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import common
import rdlm
from rdlm.data.render import ANSWER_MARK, prompt_tokens
from rdlm.data.tokenizer import load_tokenizer

NAME = "e7_latent_trajectories"
R = 64
NUM_INITS = 4


def trajectory(params, cfg, tokens: list[int], r: int, key=None) -> np.ndarray:
    """[r, length, d] states after each step (zero initial state without a key)."""
    _, aux = rdlm.forward(params, jnp.asarray([tokens]), cfg.model, num_steps=r, key=key,
                          init_scale=1.0 if key is not None else 0.0, return_trajectory=True)
    return np.asarray(aux["trajectory"][:, 0])


def pca_2d(x_nd: np.ndarray) -> np.ndarray:
    centred = x_nd - x_nd.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def main(argv: Sequence[str] | None = None) -> int:
    args = common.parse_args(argv, __doc__)
    start = time.perf_counter()
    cfg, params = common.shared_run(args)
    r = 8 if args.smoke else R
    tok = load_tokenizer(cfg.data.tokenizer)
    examples = common.test_examples(cfg, 2 if args.smoke else 16)
    # Prompt plus the answer mark: the last position is the one that predicts the answer digit.
    seqs = [prompt_tokens(e, tok) + tok.encode(ANSWER_MARK) for e in examples]

    traj = trajectory(params, cfg, seqs[0], r)  # [r, t, d]
    final = traj[-1]
    rel_tr = (np.linalg.norm(traj - final[None], axis=-1)
              / np.maximum(np.linalg.norm(final, axis=-1), 1e-9)[None])  # [r, t]
    # Path independence: the same tokens from several random initial states (and zero).
    dist = []
    for seq in seqs:
        runs = [trajectory(params, cfg, seq, r)] + [
            trajectory(params, cfg, seq, r, key=jax.random.key(i)) for i in range(NUM_INITS)]
        stack = np.stack(runs)  # [inits, r, t, d]
        spread = np.linalg.norm(stack - stack.mean(0, keepdims=True), axis=-1).mean(0)  # [r, t]
        scale = np.linalg.norm(stack.mean(0), axis=-1)
        dist.append((spread / np.maximum(scale, 1e-9)).mean(-1))  # [r]
    dist_r = np.mean(dist, 0)
    converged_at = {f"{q:.0%}": int(np.argmax(rel_tr[:, -1] < q)) + 1 if (rel_tr[:, -1] < q).any()
                    else None for q in (0.5, 0.1, 0.01)}

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    labels = [tok.decode([t]) for t in seqs[0]]
    positions = list(range(max(0, len(labels) - 6), len(labels)))
    pts = pca_2d(traj[:, positions].reshape(-1, traj.shape[-1])).reshape(r, len(positions), 2)
    for j, p in enumerate(positions):
        axes[0].plot(pts[:, j, 0], pts[:, j, 1], marker=".", ms=3, lw=1,
                     label=repr(labels[p]).strip("'") or "·")
        axes[0].scatter(pts[-1, j, 0], pts[-1, j, 1], marker="*", s=60)
    axes[0].set_title("PCA of the state, last 6 tokens (★ = step r)")
    axes[0].legend(fontsize=7)
    im = axes[1].imshow(np.log10(np.maximum(rel_tr.T, 1e-6)), aspect="auto", cmap="viridis",
                        origin="lower", extent=(0.5, r + 0.5, -0.5, len(labels) - 0.5))
    axes[1].set_xlabel("recurrence step i")
    axes[1].set_ylabel("token position")
    axes[1].set_title("log10 ‖s_i − s*‖ / ‖s*‖")
    fig.colorbar(im, ax=axes[1])
    axes[2].semilogy(range(1, r + 1), dist_r, marker=".")
    axes[2].set_xlabel("recurrence step i")
    axes[2].set_ylabel("spread across initial states (relative)")
    axes[2].set_title(f"path independence ({NUM_INITS} random + zero init)")
    fig.suptitle(f"E7: latent trajectories — {examples[0].question!r}", fontsize=9)
    common.save_figure(fig, args, NAME)

    marks = [1, 2, 4, 8, 16, 32, 64]
    marks = [i for i in marks if i <= r]
    table = common.markdown_table(
        ["step i", *marks],
        [["‖s_i − s*‖/‖s*‖ at the answer position", *[float(rel_tr[i - 1, -1]) for i in marks]],
         ["spread across initial states", *[float(dist_r[i - 1]) for i in marks]]])
    verdict = (f"at the answer position the state is within 10% of s* after "
               f"{converged_at['10%']} steps (within 1%: {converged_at['1%']}); the spread across "
               f"initial states falls from {dist_r[0]:.3f} at step 1 to {dist_r[-1]:.2e} at step "
               f"{r}" + (" — path independent." if dist_r[-1] < 0.05 * dist_r[0] else
                         " — **not** path independent at this scale."))
    common.write_report(
        args, NAME, "E7: latent trajectories",
        claim="The latent state converges to a fixed point per token (most tokens quickly), and "
              "different initial states reach the same point (path independence).",
        table=table, verdict=verdict, plot=f"{NAME}.png",
        data={"r": r, "relative_distance_to_final_at_answer": rel_tr[:, -1].tolist(),
              "spread_across_inits": dist_r.tolist(), "converged_at": converged_at},
        configs={"recurrent": cfg}, wall=time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
