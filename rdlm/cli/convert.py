"""``python -m rdlm convert``: Hugging Face safetensors <-> rdlm (orbax) checkpoints, for
Huginn-0125 and for Llama-family models retrofitted with recurrence.

    python -m rdlm convert huginn-to-rdlm  path/to/huginn-0125  ckpt/huginn
    python -m rdlm convert rdlm-to-huginn  ckpt/huginn  out/huginn-hf --dtype bfloat16 \\
        --tokenizer path/to/huginn-0125
    python -m rdlm convert llama-to-rdlm  path/to/tinyllama  ckpt/tinyllama --prelude 4 --core 14
    python -m rdlm convert rdlm-to-llama  ckpt/tinyllama  out/tinyllama-hf

Checkpoints (rdlm's side) and the Hugging Face directories written may be bucket URLs
(``gs://…``; ``s3://…`` except for rdlm checkpoints); a Hugging Face directory is assembled
locally and uploaded with config.json last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rdlm.config import Config, DataConfig
from rdlm.data.tokenizer import RUN_TOKENIZER, Tokenizer, load_tokenizer
from rdlm.interop.hf_files import (fixed_depth_card, generation_config, model_card, run_summary,
                                   tokenizer_config)
from rdlm.interop.huginn import CODE_FILES, load_huginn, save_huginn
from rdlm.interop.llama import load_llama, save_llama
from rdlm.model import count_params
from rdlm.runtime import checkpoint, storage
from rdlm.runtime.rundir import find_in_run
from rdlm.runtime.storage import StoragePath
from rdlm.train.metrics import read_metrics

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# What a converted Llama checkpoint keeps beside its weights, and hands back on export: the
# tokenizer with its own settings (chat template, added tokens) and the generation defaults.
LLAMA_KEPT_FILES = (*TOKENIZER_FILES, "generation_config.json")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdlm convert",
        description="Convert between Hugging Face checkpoints (Huginn-0125, Llama-family) and "
                    "rdlm's orbax checkpoints. Nothing is written unless the whole conversion "
                    "succeeds.")
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")

    to_rdlm = sub.add_parser("huginn-to-rdlm", help="Hugging Face directory -> orbax checkpoint",
                             description="Read config.json + safetensors (single or sharded) and "
                                         "write an rdlm params checkpoint (rdlm.runtime.checkpoint).")
    to_rdlm.add_argument("input", help="directory with config.json and model*.safetensors")
    to_rdlm.add_argument("output", help="new checkpoint directory (must not exist)")
    _to_rdlm_args(to_rdlm)

    to_hf = sub.add_parser("rdlm-to-huginn", help="orbax checkpoint -> Hugging Face directory",
                           description="Read an rdlm checkpoint (params-only, training step or "
                                       "run directory) and write config.json + safetensors that "
                                       "the original PyTorch code loads.")
    _to_hf_args(to_hf, "the release uses bfloat16", "")
    to_hf.add_argument("--include-lm-head", action="store_true",
                       help="also write the tied head as lm_head.weight (a second copy)")
    to_hf.add_argument("--code-from", metavar="DIR",
                       help="copy raven_config_minimal.py and raven_modeling_minimal.py from DIR "
                            "(e.g. the downloaded huginn-0125) so that the output loads offline")
    to_hf.add_argument("--code-repo", metavar="REPO",
                       help="let auto_map point at this Hugging Face repository instead of local "
                            "files (e.g. tomg-group-umd/huginn-0125)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _llama_parsers(sub)
    return parser


def _to_rdlm_args(parser: argparse.ArgumentParser) -> None:
    """The dtype options of a Hugging Face -> rdlm conversion."""
    parser.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="model.dtype of the checkpoint's config; auto: bfloat16 when "
                             "config.json's torch_dtype/dtype is bfloat16, else float32")
    parser.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the stored parameters (default float32)")


def _to_hf_args(parser: argparse.ArgumentParser, dtype_note: str, tokenizer_note: str) -> None:
    """Input, output, dtype, shards and tokenizer of an rdlm -> Hugging Face export."""
    parser.add_argument("input", help="rdlm checkpoint or run directory")
    parser.add_argument("output", help="new Hugging Face directory (must not exist)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help=f"dtype of the written tensors ({dtype_note})")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="split into model-0000k-of-0000n.safetensors above this "
                             "(default 5GB)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer.json, or a directory whose tokenizer files are copied "
                             f"along{tokenizer_note}")


def _llama_parsers(sub: argparse._SubParsersAction) -> None:
    to_rdlm = sub.add_parser(
        "llama-to-rdlm", help="Llama-family Hugging Face directory -> recurrent-depth checkpoint",
        description="Split a LlamaForCausalLM checkpoint's layers into prelude [0, K), recurrent "
                    "core [K, K+M) and coda (the rest), with the adapter at [0; I]: at r = 1 the "
                    "result computes the original logits. `rdlm analyze-layers` suggests K and M.")
    to_rdlm.add_argument("input", help="directory with config.json, model*.safetensors and "
                                       "(optionally) tokenizer.json")
    to_rdlm.add_argument("output", help="new checkpoint directory (must not exist)")
    to_rdlm.add_argument("--prelude", type=int, required=True, metavar="K",
                         help="layers before the recurrent core")
    to_rdlm.add_argument("--core", type=int, required=True, metavar="M",
                         help="layers of the recurrent core (iterated r times)")
    _to_rdlm_args(to_rdlm)

    to_hf = sub.add_parser(
        "rdlm-to-llama", help="llama-block checkpoint with a [0; I] adapter -> LlamaForCausalLM",
        description="Write prelude, core and coda as the consecutive layers of one fixed-depth "
                    "LlamaForCausalLM. Only a model whose adapter is still [0; I] is such a "
                    "network (it then computes the same at every r); others are refused.")
    _to_hf_args(to_hf, "float32: exact", " (default: the files kept with the checkpoint)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _tokenizer_files(path: str | None) -> dict[str, StoragePath]:
    if path is None:
        return {}
    source = storage.as_given(path)
    if source.is_file():
        return {"tokenizer.json": source}
    files = {name: source / name for name in TOKENIZER_FILES if (source / name).is_file()}
    if "tokenizer.json" not in files:
        raise FileNotFoundError(f"no tokenizer.json in {str(source)!r}.")
    return files


def _code_files(directory: str | None) -> dict[str, StoragePath]:
    if directory is None:
        return {}
    files = {name: storage.as_given(directory) / name for name in CODE_FILES}
    absent = [str(f) for f in files.values() if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"--code-from: {absent} do not exist.")
    return files


def _auto_compute_dtype(input_dir: str) -> str:
    try:
        hf = json.loads((Path(input_dir) / "config.json").read_text())
        torch_dtype = hf.get("torch_dtype", hf.get("dtype"))  # transformers 5 writes "dtype"
    except (OSError, ValueError, AttributeError):
        return "float32"  # the loader reports the unreadable config.json
    return "bfloat16" if torch_dtype == "bfloat16" else "float32"


def huginn_to_rdlm(args: argparse.Namespace) -> None:
    if storage.as_path(args.output).exists():
        raise FileExistsError(f"{args.output!r} already exists; choose a new path.")
    compute = _auto_compute_dtype(args.input) if args.compute_dtype == "auto" else args.compute_dtype
    cfg, params = load_huginn(args.input, dtype=args.param_dtype, compute_dtype=compute)
    output = storage.as_path(args.output)  # a folder or a bucket
    tokenizer = Path(args.input) / RUN_TOKENIZER
    data = DataConfig(tokenizer=str(output / RUN_TOKENIZER)) if tokenizer.is_file() else DataConfig()
    checkpoint.save_params(output, Config(model=cfg, data=data), params)
    if tokenizer.is_file():  # kept with the checkpoint: sample, eval and export find it there
        storage.copy_file(tokenizer, output / RUN_TOKENIZER)
    print(f"wrote {args.output}: {count_params(cfg):,} parameters "
          f"({cfg.n_prelude}/{cfg.n_core}/{cfg.n_coda} layers, d={cfg.d_model}, "
          f"vocab={cfg.vocab_size}, model.dtype={cfg.dtype})"
          + (", with its tokenizer.json" if tokenizer.is_file() else ""))


def _run_files(args: argparse.Namespace, config: Config
               ) -> tuple[dict[str, StoragePath], dict[str, str]]:
    """(files to copy, texts to write) beside the weights: the tokenizer (``--tokenizer``, else
    the run's own tokenizer.json), its tokenizer_config.json and generation_config.json, and a
    model card from the run's config and metrics."""
    files = _tokenizer_files(args.tokenizer)
    if not files:
        kept = find_in_run(args.input, RUN_TOKENIZER)
        if kept is not None:
            files = {RUN_TOKENIZER: kept}
    tok = load_tokenizer(files[RUN_TOKENIZER]) if files else None
    if tok is None:
        print(f"note: no tokenizer.json for this run (data.tokenizer={config.data.tokenizer!r}); "
              "the export has none. Pass --tokenizer PATH to include one.", file=sys.stderr)
    metrics = find_in_run(args.input, "metrics.jsonl")
    summary = run_summary(read_metrics(metrics)) if metrics else {}
    texts = {"README.md": model_card(config, summary, tok)}
    if tok is not None:
        texts["generation_config.json"] = json.dumps(generation_config(tok), indent=2) + "\n"
        if "tokenizer_config.json" not in files:
            texts["tokenizer_config.json"] = json.dumps(
                tokenizer_config(tok, config.model.max_seq_len), indent=2) + "\n"
    return files, texts


def rdlm_to_huginn(args: argparse.Namespace) -> None:
    if args.code_from and args.code_repo:
        raise ValueError("give --code-from or --code-repo, not both.")
    if storage.as_path(args.output).exists() and not args.overwrite:
        raise FileExistsError(f"{args.output!r} already exists; pass --overwrite to replace it.")
    config, params = checkpoint.load_params(args.input, report=checkpoint.say_on_stderr)
    files, texts = _run_files(args, config)
    out = save_huginn(config.model, params, args.output, max_shard_size=args.max_shard_size,
                      dtype=args.dtype, code_repo=args.code_repo,
                      include_lm_head=args.include_lm_head, overwrite=args.overwrite,
                      extra_files={**files, **_code_files(args.code_from)}, extra_texts=texts)
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


def llama_to_rdlm(args: argparse.Namespace) -> None:
    if storage.as_path(args.output).exists():
        raise FileExistsError(f"{args.output!r} already exists; choose a new path.")
    compute = _auto_compute_dtype(args.input) if args.compute_dtype == "auto" else args.compute_dtype
    # Checks config.json, the split, every tensor and the tokenizer before anything is written.
    cfg, params = load_llama(args.input, prelude=args.prelude, core=args.core,
                             dtype=args.param_dtype, compute_dtype=compute)
    output = storage.as_path(args.output)  # a folder or a bucket
    kept = {name: Path(args.input) / name for name in LLAMA_KEPT_FILES
            if (Path(args.input) / name).is_file()}
    has_tokenizer = RUN_TOKENIZER in kept
    data = DataConfig(tokenizer=str(output / RUN_TOKENIZER)) if has_tokenizer else DataConfig()
    checkpoint.save_params(output, Config(model=cfg, data=data), params)
    for name, source in kept.items():  # sample, eval and rdlm-to-llama find them there
        storage.copy_file(source, output / name)
    if not has_tokenizer:
        print(f"note: {args.input} has no tokenizer.json (a tokenizer.model alone is not read); "
              "pass --tokenizer to sample and eval.", file=sys.stderr)
    print(f"wrote {args.output}: {count_params(cfg):,} parameters, layers "
          f"[0, {cfg.n_prelude}) prelude, [{cfg.n_prelude}, {cfg.n_prelude + cfg.n_core}) core, "
          f"{cfg.n_coda} coda (d={cfg.d_model}, vocab={cfg.vocab_size}, "
          f"model.dtype={cfg.dtype}); at r = 1 it computes the original network"
          + (", with its tokenizer" if has_tokenizer else ""))


def _token_ids(files: dict[str, StoragePath], tok: Tokenizer | None) -> dict[str, Any]:
    """bos/eos/pad ids for config.json: the original generation_config.json's when it travelled
    with the checkpoint (it may list several stop ids), else the tokenizer's roles."""
    ids = generation_config(tok)
    if "generation_config.json" in files:
        kept = json.loads(files["generation_config.json"].read_text())
        ids.update({k: kept[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                    if kept.get(k) is not None})
    return ids


def rdlm_to_llama(args: argparse.Namespace) -> None:
    if storage.as_path(args.output).exists() and not args.overwrite:
        raise FileExistsError(f"{args.output!r} already exists; pass --overwrite to replace it.")
    config, params = checkpoint.load_params(args.input, report=checkpoint.say_on_stderr)
    files = _tokenizer_files(args.tokenizer)
    if not files:
        found = {name: find_in_run(args.input, name) for name in LLAMA_KEPT_FILES}
        files = {name: path for name, path in found.items() if path is not None}
    if RUN_TOKENIZER not in files:
        files = {}  # settings without the tokenizer they belong to would mislead
    tok = load_tokenizer(files[RUN_TOKENIZER]) if files else None
    texts = {"README.md": fixed_depth_card(config, tok)}
    if tok is not None:
        if "tokenizer_config.json" not in files:
            texts["tokenizer_config.json"] = json.dumps(
                tokenizer_config(tok, config.model.max_seq_len), indent=2) + "\n"
        if "generation_config.json" not in files:
            texts["generation_config.json"] = json.dumps(generation_config(tok), indent=2) + "\n"
    out = save_llama(config.model, params, args.output, max_shard_size=args.max_shard_size,
                     dtype=args.dtype, overwrite=args.overwrite, token_ids=_token_ids(files, tok),
                     extra_files=files, extra_texts=texts)
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


DIRECTIONS = {"huginn-to-rdlm": huginn_to_rdlm, "rdlm-to-huginn": rdlm_to_huginn,
              "llama-to-rdlm": llama_to_rdlm, "rdlm-to-llama": rdlm_to_llama}


def cli(argv: list[str] | None = None) -> int:
    """``rdlm convert DIRECTION IN OUT``; errors are reported by `rdlm.cli.main` as one line."""
    args = _parser().parse_args(argv)
    storage.check_access(args.output, "OUTPUT")  # before anything is read: one clear error
    DIRECTIONS[args.direction](args)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
