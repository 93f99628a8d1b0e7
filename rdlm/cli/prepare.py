"""``rdlm prepare``: tokenize text/JSONL into training shards (and train a tokenizer for it)."""

from __future__ import annotations

import argparse
from typing import Sequence

from rdlm.data import prepare as prepare_module
from rdlm.data.prepare import FORMATS, prepare


def cli(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rdlm prepare", description=prepare_module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help=".txt, .jsonl or .json files")
    parser.add_argument("--tokenizer", required=True,
                        help="a tokenizer.json, 'chars' / 'ascii', or bpe:VOCAB_SIZE to train a "
                        "byte-level BPE on the inputs (saved as OUTPUT/tokenizer.json)")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--prefix", default="train", help="shard name prefix, e.g. the split")
    parser.add_argument("--test-fraction", type=float, default=0.0,
                        help="hold out this share of the documents as test-* shards (the rest "
                        "are train-*); e.g. 0.05")
    parser.add_argument("--format", default="npy", choices=FORMATS)
    parser.add_argument("--shard-tokens", type=int, default=50_000_000)
    parser.add_argument("--text-key", default="text", help="JSON field holding the text")
    parser.add_argument("--txt-documents", default="paragraph",
                        choices=("paragraph", "line", "file"),
                        help="how a .txt file splits into documents")
    args = parser.parse_args(list(argv))
    meta = prepare(args.inputs, tokenizer=args.tokenizer, output=args.output, prefix=args.prefix,
                   fmt=args.format, shard_tokens=args.shard_tokens, text_key=args.text_key,
                   txt_documents=args.txt_documents, test_fraction=args.test_fraction)
    for name, split in (meta.items() if args.test_fraction else [(args.prefix, meta)]):
        print(f"{name}: {split['documents']} documents, {split['tokens']} tokens in "
              f"{len(split['files'])} {args.format} shard(s) under {args.output}")
    if args.tokenizer.startswith("bpe:"):
        print(f"tokenizer: {args.output}/tokenizer.json ({args.tokenizer.removeprefix('bpe:')} "
              "tokens); train with data.tokenizer pointing at it")
    return 0
