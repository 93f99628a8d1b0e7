"""An independent NumPy transcription of the published architecture (SPEC §1), for tests only.

It reads tensors in the Hugging Face Huginn-0125 layout (PyTorch ``[out, in]`` matrices, fused
``Wqkv`` rows q|k|v, fused ``fc`` rows gate|up, ``adapter`` over [state, e]) and shares no code with
`rdlm`, so agreement with `rdlm.forward` checks both the model and any conversion between layouts.
"""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """x: [T, H, hd]; complex-like rotation of consecutive pairs."""
    hd = x.shape[-1]
    inv = 1.0 / (base ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    ang = positions.astype(np.float32)[:, None] * inv[None, :]  # [T, hd/2]
    c = np.exp(1j * ang)[:, None, :]  # [T, 1, hd/2]
    xc = x[..., 0::2] + 1j * x[..., 1::2]
    r = xc * c
    out = np.empty_like(x)
    out[..., 0::2] = r.real
    out[..., 1::2] = r.imag
    return out


def block(x: np.ndarray, t: dict, prefix: str, n_heads: int, eps: float, base: float) -> np.ndarray:
    """One sandwich block on a single sequence x: [T, d]."""
    T, d = x.shape
    hd = d // n_heads
    h = rms_norm(x, t[prefix + "norm_1.weight"], eps)
    qkv = h @ t[prefix + "attn.Wqkv.weight"].T
    q, k, v = (qkv[:, i * d:(i + 1) * d].reshape(T, n_heads, hd) for i in range(3))
    if prefix + "attn.qk_bias" in t:
        bias = t[prefix + "attn.qk_bias"]
        q, k = q + bias[0, 0], k + bias[1, 0]
    pos = np.arange(T)
    q, k = rope(q, pos, base), rope(k, pos, base)
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((T, T), bool))[None], scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    att = np.einsum("hts,shd->thd", probs, v).reshape(T, d) @ t[prefix + "attn.proj.weight"].T
    x = rms_norm(x + att, t[prefix + "norm_2.weight"], eps)
    h = rms_norm(x, t[prefix + "norm_3.weight"], eps) @ t[prefix + "mlp.fc.weight"].T
    gate, up = np.split(h, 2, axis=-1)
    mlp = (gate / (1 + np.exp(-gate)) * up) @ t[prefix + "mlp.proj.weight"].T
    return rms_norm(x + mlp, t[prefix + "norm_4.weight"], eps)


def forward(tensors: dict, config: dict, tokens: np.ndarray, num_steps: int) -> np.ndarray:
    """Logits [T, V] for one sequence, zero initial state, float32/float64 NumPy."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    d, H, eps, base = config["n_embd"], config["n_heads"], config["norm_eps"], config["rope_base"]
    wte = t["transformer.wte.weight"]
    x = wte[tokens] * np.sqrt(d)
    for i in range(config["n_layers_in_prelude"]):
        x = block(x, t, f"transformer.prelude.{i}.", H, eps, base)
    e = x
    s = np.zeros_like(e)
    for _ in range(num_steps):
        s = np.concatenate([s, e], axis=-1) @ t["transformer.adapter.weight"].T
        for i in range(config["n_layers_in_recurrent_block"]):
            s = block(s, t, f"transformer.core_block.{i}.", H, eps, base)
    x = rms_norm(s, t["transformer.ln_f.weight"], eps)
    for i in range(config["n_layers_in_coda"]):
        x = block(x, t, f"transformer.coda.{i}.", H, eps, base)
    x = rms_norm(x, t["transformer.ln_f.weight"], eps)
    head = t.get("lm_head.weight", wte)
    return x @ head.T
