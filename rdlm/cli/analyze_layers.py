"""``python -m rdlm analyze-layers``: per-layer block influence and angular distances of a
pretrained fixed-depth network on your own text, and the prelude / core / coda split they suggest
for `rdlm convert llama-to-rdlm`.

    python -m rdlm analyze-layers path/to/tinyllama --text notes.txt --tokens 512 --out analysis/
    python -m rdlm analyze-layers ckpt/tinyllama --text notes.txt      # a converted checkpoint
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rdlm.config import ModelConfig
from rdlm.data.tokenizer import Tokenizer, load_tokenizer, run_tokenizer
from rdlm.errors import ConfigError
from rdlm.interop.layer_analysis import analyze_layers, layer_table, write_report
from rdlm.interop.llama import fixed_depth_problems, load_llama
from rdlm.interop.safetensors_io import INDEX_FILE, SINGLE_FILE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdlm analyze-layers",
        description="One forward pass of the fixed-depth network over your text: each layer's "
                    "block influence (1 - mean cosine of its input and output) and the angular "
                    "distance d(h_l, h_{l+n}) between layers; prints a table, writes layers.json, "
                    "layers.txt and layers.png, and suggests --prelude/--core for "
                    "`rdlm convert llama-to-rdlm`.")
    parser.add_argument("source", help="a Llama-family Hugging Face directory, or an rdlm "
                                       "checkpoint converted from one (adapter still [0; I])")
    parser.add_argument("--text", required=True, metavar="FILE", help="a UTF-8 text file")
    parser.add_argument("--tokens", type=int, default=512, metavar="N",
                        help="analyse the first N tokens of the text, in windows of the "
                             "model's context (default 512)")
    parser.add_argument("--core", type=int, metavar="M",
                        help="suggest the best window of M core layers instead of the plateau")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer.json (default: the one beside the weights)")
    parser.add_argument("--out", default="layer-analysis", metavar="DIR",
                        help="where layers.json/.txt/.png go (default ./layer-analysis)")
    return parser


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / SINGLE_FILE).is_file()
                                                 or (path / INDEX_FILE).is_file())


def load_network(source: str) -> tuple[ModelConfig, Any, str]:
    """(cfg, params, tokenizer spec) of the fixed-depth network at ``source``."""
    path = Path(source).expanduser().absolute()
    if _is_hf_dir(path):
        try:
            layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
        except (ValueError, KeyError, TypeError):
            layers = None  # load_llama names the problem
        # All layers in the core: at r = 1 with the [0; I] adapter, the plain stack.
        cfg, params = load_llama(path, prelude=0, core=layers if isinstance(layers, int) else 1)
        return cfg, params, str(path)
    from rdlm.runtime import checkpoint  # deferred: orbax loads only for checkpoints

    config, params = checkpoint.load_params(path, report=checkpoint.say_on_stderr)
    problems = fixed_depth_problems(config.model, params["core"]["adapter"]
                                    if config.model.block == "llama" else None)
    if problems:
        raise ConfigError(f"{source}: not a fixed-depth network, so it has no layer profile to "
                          f"analyse: {' '.join(problems)}")
    return config.model, params, config.data.tokenizer


def _tokenizer(args: argparse.Namespace, spec: str) -> Tokenizer:
    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer)
    return run_tokenizer(args.source, spec)


def cli(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.tokens < 2:
        raise ConfigError(f"--tokens {args.tokens} is invalid: analyse at least 2 tokens.")
    text = Path(args.text).read_text(encoding="utf-8")
    cfg, params, spec = load_network(args.source)
    tok = _tokenizer(args, spec)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer {tok.name!r} has {tok.vocab_size} tokens, the model "
                          f"{cfg.vocab_size}: pass the model's own tokenizer (--tokenizer PATH).")
    ids = tok.prompt(text)[:args.tokens]
    if len(ids) < 2:
        raise ConfigError(f"{args.text} holds {len(ids)} token(s); give a longer text.")
    analysis = analyze_layers(params, cfg, ids, core=args.core)
    print(layer_table(analysis))
    files = write_report(analysis, args.out, source=str(args.source))
    print("wrote " + ", ".join(str(f) for f in files))
    if _is_hf_dir(Path(args.source).expanduser()):
        k, m, _ = analysis.split
        print(f"convert with: rdlm convert llama-to-rdlm {args.source} OUT --prelude {k} "
              f"--core {m}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
