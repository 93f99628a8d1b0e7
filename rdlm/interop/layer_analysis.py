"""Which layers of a pretrained fixed-depth network to iterate: per-layer statistics of one forward
pass over the user's own text, and a suggested prelude / core / coda split.

With h_0 the embeddings and h_l the residual stream after layer l (l = 1..L), averaged over every
token of the text:

- block influence of layer l (0-based, "ShortGPT", Men et al. 2024): 1 − mean cos(h_l, h_{l+1}),
  how much the layer turns the residual stream;
- angular distance d(h_l, h_{l+n}) = mean arccos(cos(h_l, h_{l+n})) / π for every n = 1..L − l
  (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers", who take the last
  token of many texts; here every token of one text counts): the block of n layers starting at l
  that changes the representation least is where it is smallest.

The suggestion keeps the first and the last layer out of the core (they map tokens in and out
of the residual stream and have the highest influence in practice), then takes as core the
"plateau": the longest run of consecutive layers whose influence is at most the median of those
inner layers' (ties: the lower mean influence, then the earlier run). Given a core size instead,
it takes the window of that many inner layers with the lowest mean influence. The layers before
the core are the prelude, the rest the coda. It is a starting point: the retrofitting recipe
trains the converted model, and a core of similar layers is what iterating is likely to tolerate.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdlm.config import ModelConfig
from rdlm.errors import ConfigError
from rdlm.model.attention import attention_context
from rdlm.model.model import make_block

RULE_PLATEAU = ("core = the longest run of inner layers (not the first or last) whose block "
                "influence is at most the median of the inner layers'")
RULE_WINDOW = "core = the window of {m} inner layers with the lowest mean block influence"


@dataclasses.dataclass(frozen=True)
class LayerAnalysis:
    """Per-layer statistics of one text and the split they suggest."""

    influence: np.ndarray  # [L]: 1 − mean cos(h_l, h_{l+1}), layer l's block influence
    angular: np.ndarray  # [L, L]: [l, n-1] = d(h_l, h_{l+n}); NaN where l + n > L
    tokens: int  # tokens the statistics average over
    split: tuple[int, int, int]  # suggested (prelude, core, coda) layers
    rule: str  # how the core was chosen

    @property
    def n_layers(self) -> int:
        return len(self.influence)

    def to_json(self) -> dict[str, Any]:
        k, m, c = self.split
        return {"layers": self.n_layers, "tokens": self.tokens,
                "block_influence": [round(float(x), 6) for x in self.influence],
                "angular_distance_to_next": [round(float(x), 6) for x in self.angular[:, 0]],
                # row l: d(h_l, h_{l+n}) for n = 1 .. L - l
                "angular_distance": [[round(float(x), 6) for x in row[:self.n_layers - i]]
                                     for i, row in enumerate(self.angular)],
                "suggested_split": {"prelude": k, "core": m, "coda": c,
                                    "core_layers": [k, k + m]},
                "rule": self.rule}


def layer_statistics(hidden_ltd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(block influence [L], angular distance [L, L]) of hidden states [L + 1, tokens, d]: h_0
    the embeddings, h_l the output of layer l. Float64, averaged over tokens."""
    h = np.asarray(hidden_ltd, np.float64)
    unit = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-30)
    n_layers = h.shape[0] - 1
    influence = np.array([1.0 - np.mean(np.sum(unit[i] * unit[i + 1], -1))
                          for i in range(n_layers)])
    angular = np.full((n_layers, n_layers), np.nan)
    for i in range(n_layers):
        for n in range(1, n_layers - i + 1):
            cos = np.clip(np.sum(unit[i] * unit[i + n], -1), -1.0, 1.0)
            angular[i, n - 1] = np.mean(np.arccos(cos)) / np.pi
    return influence, angular


def _runs(mask: Sequence[bool], offset: int) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in ``mask``, starts shifted by ``offset``."""
    runs, start = [], None
    for i, flag in enumerate([*mask, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start + offset, i - start))
            start = None
    return runs


def suggest_split(influence: Sequence[float], core: int | None = None
                  ) -> tuple[tuple[int, int, int], str]:
    """((prelude, core, coda), the rule applied) for layers with this block influence; see the
    module docstring. ``core``: the number of core layers wanted (default: the plateau's)."""
    bi = np.asarray(influence, np.float64)
    n = len(bi)
    if core is not None and not 1 <= core <= max(n - 2, 1):
        raise ConfigError(f"core={core} is invalid: with {n} layers the core takes between 1 and "
                          f"{max(n - 2, 1)} of the inner layers (the first and last stay out).")
    if n < 3:  # no inner layers: everything is the core
        return (0, n, 0), "fewer than 3 layers: all of them form the core"
    inner = bi[1:n - 1]
    if core is not None:
        means = [inner[k:k + core].mean() for k in range(len(inner) - core + 1)]
        k = int(np.argmin(means)) + 1
        return (k, core, n - k - core), RULE_WINDOW.format(m=core)
    runs = _runs(list(inner <= np.median(inner)), offset=1)
    k, m = min(runs, key=lambda r: (-r[1], bi[r[0]:r[0] + r[1]].mean(), r[0]))
    return (k, m, n - k - m), RULE_PLATEAU


@functools.lru_cache(maxsize=8)
def _block_graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: make_block(cfg, rngs=nnx.Rngs(0))))


@functools.partial(jax.jit, static_argnums=0)
def _apply_block(cfg: ModelConfig, block_params: Any, x_btd: jax.Array) -> jax.Array:
    # Every layer has the same shapes: one compilation serves the whole stack.
    block = nnx.merge(_block_graphdef(cfg), block_params)
    return block(x_btd, attention_context(cfg, x_btd.shape[0], x_btd.shape[1]))[0]


def stack_blocks(params: Any, cfg: ModelConfig) -> list[Any]:
    """The blocks' params in network order: prelude, core (once), coda."""
    # An empty prelude or coda has no entry in the params at all.
    groups = (params.get("prelude", {}), params["core"]["blocks"], params.get("coda", {}))
    return [group[i] for group in groups for i in sorted(group, key=int)]


def hidden_states(params: Any, cfg: ModelConfig, tokens_t: Sequence[int]) -> np.ndarray:
    """[L + 1, tokens, d] float32: the embeddings and each layer's output of the fixed-depth
    network that prelude, core (once) and coda form — what a converted checkpoint computed.
    ``cfg`` must be the llama block (no embedding scale, no norm between the layers). A text
    longer than the model's context is read in consecutive windows of ``cfg.max_seq_len``."""
    if cfg.block != "llama" or cfg.token_shift:
        raise ConfigError(f"layer analysis runs the llama block's fixed-depth stack; "
                          f"model.block={cfg.block!r}, token_shift={cfg.token_shift} is not one.")
    ids_t = np.asarray(tokens_t, np.int32)
    windows = [_window_states(params, cfg, ids_t[i:i + cfg.max_seq_len])
               for i in range(0, len(ids_t), cfg.max_seq_len)]
    return np.concatenate(windows, axis=1)


def _window_states(params: Any, cfg: ModelConfig, ids_t: np.ndarray) -> np.ndarray:
    """`hidden_states` of one window that fits the context."""
    x_btd = jnp.take(jnp.asarray(params["wte"]), jnp.asarray(ids_t[None]), axis=0)
    x_btd = x_btd.astype(cfg.dtype)
    states = [np.asarray(x_btd[0], np.float32)]
    for block_params in stack_blocks(params, cfg):
        x_btd = _apply_block(cfg, block_params, x_btd)
        states.append(np.asarray(x_btd[0], np.float32))
    return np.stack(states)


def analyze_layers(params: Any, cfg: ModelConfig, tokens_t: Sequence[int], *,
                   core: int | None = None) -> LayerAnalysis:
    """Block influence and angular distances of every layer on ``tokens_t`` (one text), and the
    suggested split (``core``: fix the core's size, else the plateau's)."""
    influence, angular = layer_statistics(hidden_states(params, cfg, tokens_t))
    split, rule = suggest_split(influence, core)
    return LayerAnalysis(influence, angular, len(tokens_t), split, rule)


def layer_table(analysis: LayerAnalysis) -> str:
    """A per-layer text table: influence, angular distance to the next layer, and the part of
    the suggested split each layer goes to."""
    k, m, _ = analysis.split
    width = max(analysis.influence.max(), 1e-12)
    lines = [f"{'layer':>5}  {'influence':>9}  {'angle→next':>10}  {'part':<7}  influence",
             f"{'-' * 5}  {'-' * 9}  {'-' * 10}  {'-' * 7}  {'-' * 20}"]
    for i, (bi, angle) in enumerate(zip(analysis.influence, analysis.angular[:, 0])):
        part = "prelude" if i < k else "core" if i < k + m else "coda"
        bar = "#" * max(1, round(20 * bi / width)) if bi > 0 else ""
        lines.append(f"{i:>5}  {bi:>9.4f}  {angle:>10.4f}  {part:<7}  {bar}")
    lines.append(f"suggested split: --prelude {k} --core {m} (coda {analysis.split[2]}); "
                 f"{analysis.rule}; {analysis.tokens} tokens")
    return "\n".join(lines)


def plot_layers(analysis: LayerAnalysis, path: str | Path, title: str = "") -> Path:
    """Block influence per layer (the suggested core shaded) beside the angular-distance map
    d(h_l, h_{l+n}), as a PNG."""
    import matplotlib  # deferred: only the plot needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, m, _ = analysis.split
    n = analysis.n_layers
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.bar(range(n), analysis.influence, color="tab:blue")
    left.axvspan(k - 0.5, k + m - 0.5, color="tab:orange", alpha=0.25, label="suggested core")
    left.set(xlabel="layer l", ylabel="block influence 1 − cos(h_l, h_{l+1})",
             title="block influence")
    left.legend()
    image = right.imshow(np.ma.masked_invalid(analysis.angular), aspect="auto", origin="lower",
                         cmap="viridis", extent=(0.5, n + 0.5, -0.5, n - 0.5))
    right.set(xlabel="block size n", ylabel="first layer l",
              title="angular distance d(h_l, h_{l+n})")
    fig.colorbar(image, ax=right)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(analysis: LayerAnalysis, directory: str | Path, source: str = "") -> list[Path]:
    """``layers.json``, ``layers.txt`` (the table) and ``layers.png`` in ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layers.json").write_text(json.dumps({"source": source, **analysis.to_json()},
                                                indent=1) + "\n")
    (out / "layers.txt").write_text(layer_table(analysis) + "\n")
    return [out / "layers.json", out / "layers.txt",
            plot_layers(analysis, out / "layers.png", title=source)]
