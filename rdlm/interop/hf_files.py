"""The files a Hugging Face model directory carries beside config.json and the weights:
``tokenizer_config.json``, ``generation_config.json`` and a model card (``README.md``), written
by ``rdlm convert rdlm-to-huginn`` from the run's config, tokenizer and metrics."""

from __future__ import annotations

import json
from typing import Any, Sequence

from rdlm.config import Config
from rdlm.data.tokenizer import Tokenizer

# Huginn-0125's chat format (`Tokenizer.chat_text`) as a Jinja template for `transformers`.
HUGINN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|begin_header|>{{ message['role'] }}"
    "<|end_header|>\n\n{{ message['content'] }}<|end_turn|>{% endfor %}"
    "{% if add_generation_prompt %}<|begin_header|>Huginn<|end_header|>\n\n{% endif %}")


def _spelling(tok: Tokenizer, role: str) -> str | None:
    return tok.special_spellings.get(role)


def tokenizer_config(tok: Tokenizer, max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json``: the fast tokenizer class and its special tokens by role, plus
    the chat template when the vocabulary has Huginn's chat tokens."""
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                           "model_max_length": max_length, "clean_up_tokenization_spaces": False,
                           "add_bos_token": False, "add_eos_token": False}
    for role in ("bos", "eos", "pad"):
        if _spelling(tok, role) is not None:
            out[f"{role}_token"] = _spelling(tok, role)
    if all(_spelling(tok, r) for r in ("bos", "begin_header", "end_header", "end_turn")):
        out["chat_template"] = HUGINN_CHAT_TEMPLATE
    return out


def generation_config(tok: Tokenizer | None) -> dict[str, Any]:
    """``generation_config.json``: the token ids generation starts, pads and stops with."""
    if tok is None:
        return {}
    out: dict[str, Any] = {}
    for role, key in (("bos", "bos_token_id"), ("pad", "pad_token_id")):
        if tok.special_ids.get(role) is not None:
            out[key] = tok.special_ids[role]
    stops = list(tok.stop_ids)
    if stops:
        out["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return out


def run_summary(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Steps, final loss and the last held-out eval of a run's metrics.jsonl records."""
    steps = [r for r in records if "loss" in r]
    if not steps:
        return {}
    evals = next(({k: v for k, v in r.items() if k.startswith("eval/")}
                  for r in reversed(records) if any(k.startswith("eval/") for k in r)), {})
    return {"steps": steps[-1]["step"], "final_loss": steps[-1]["loss"], "eval": evals}


def model_card(cfg: Config, summary: dict[str, Any], tok: Tokenizer | None) -> str:
    """``README.md``: what the model is, its shape, how it was trained, and how to load it."""
    m, t = cfg.model, cfg.train
    lines = ["---", "library_name: transformers", "tags: [recurrent-depth, rdlm, huginn]", "---",
             "", "# Recurrent-depth language model", "",
             "A recurrent-depth transformer in the Huginn-0125 format: a prelude embeds the "
             "tokens, a core block is iterated r times in latent space, a coda decodes. More "
             "iterations at test time mean more computation per token with the same parameters.",
             "", "## Shape", "", "| | |", "|---|---|",
             f"| layers (prelude / core / coda) | {m.n_prelude} / {m.n_core} / {m.n_coda} |",
             f"| width / heads / MLP | {m.d_model} / {m.n_heads} / {m.mlp_dim} |",
             f"| vocabulary | {m.vocab_size} |", f"| context | {m.max_seq_len} |",
             f"| training mean of r | {m.mean_recurrence} |",
             f"| tokenizer | {tok.name.rsplit('/', 1)[-1] if tok else cfg.data.tokenizer} |", ""]
    if summary:
        lines += ["## Training", "", f"{summary['steps']} steps of {t.batch_size} × {t.seq_len} "
                  f"tokens on `{cfg.data.source}` data ({', '.join(cfg.data.paths) or cfg.data.task}"
                  f"), optimizer {t.optimizer}, lr {t.lr}. Final training loss "
                  f"{summary['final_loss']:.4f}."]
        if summary["eval"]:
            lines += ["", "| held-out loss at r | " + " | ".join(
                k.rsplit("_r", 1)[1] for k in summary["eval"]) + " |",
                "|---|" + "---:|" * len(summary["eval"]),
                "| | " + " | ".join(f"{v:.4f}" for v in summary["eval"].values()) + " |"]
        lines.append("")
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, "
              "AutoTokenizer", "model = AutoModelForCausalLM.from_pretrained(PATH, "
              "trust_remote_code=True)", "tokenizer = AutoTokenizer.from_pretrained(PATH)",
              "```", "", "or with rdlm: `rdlm convert huginn-to-rdlm PATH ckpt && rdlm sample "
              "--checkpoint ckpt --prompt TEXT --num-steps 32`.", "",
              "The resolved rdlm config of the run:", "", "```json",
              json.dumps({"model": json.loads(json.dumps(m.__dict__, default=str))}, indent=1),
              "```", ""]
    return "\n".join(lines)


def _span(start: int, count: int) -> str:
    return "none" if count == 0 else f"{start}–{start + count - 1}"


def fixed_depth_card(cfg: Config, tok: Tokenizer | None) -> str:
    """``README.md`` of a fixed-depth Llama export (`rdlm convert rdlm-to-llama`): the layers it
    is made of, and how to load it."""
    m = cfg.model
    layers = m.n_prelude + m.n_core + m.n_coda
    lines = ["---", "library_name: transformers", "tags: [llama, rdlm]", "---", "",
             "# Llama-architecture model exported by rdlm", "",
             f"A fixed-depth `LlamaForCausalLM` of {layers} layers: rdlm's prelude (layers "
             f"{_span(0, m.n_prelude)}), recurrent core ({_span(m.n_prelude, m.n_core)}) and "
             f"coda ({_span(m.n_prelude + m.n_core, m.n_coda)}) written consecutively. Its "
             "core adapter was still [0; I], so this network is what the rdlm model computes at "
             "every number of recurrence steps.", "", "| | |", "|---|---|",
             f"| layers | {layers} |",
             f"| width / heads / key-value heads / MLP | {m.d_model} / {m.n_heads} / "
             f"{m.kv_heads} / {m.mlp_dim} |",
             f"| vocabulary | {m.vocab_size} |", f"| context | {m.max_seq_len} |",
             f"| tokenizer | {tok.name.rsplit('/', 1)[-1] if tok else cfg.data.tokenizer} |", "",
             "## Use", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(PATH)",
             "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", ""]
    return "\n".join(lines)
