"""``python -m rdlm bench train CONFIG`` / ``bench sample CONFIG``: dispatch to `rdlm.bench`."""

from __future__ import annotations

import importlib
import sys

TARGETS = {"train": "rdlm.bench.train", "sample": "rdlm.bench.sample",
           "coconut": "rdlm.bench.coconut", "storage": "rdlm.bench.storage"}


def cli(argv: list[str]) -> int:
    if not argv or argv[0] not in TARGETS:
        print(f"usage: rdlm bench {{{','.join(TARGETS)}}} CONFIG [key=value ...]",
              file=sys.stderr)
        return 2
    return int(importlib.import_module(TARGETS[argv[0]]).bench_cli(argv[1:]) or 0)
