"""E5 — KV-cache sharing: accuracy and cache memory vs the budget of recurrence slots.

    python experiments/e5_cache_sharing.py
    python experiments/e5_cache_sharing.py --smoke

Uses the shared recurrent run at r = 16 (step i reads and writes slot i mod budget).
"""

from __future__ import annotations

import time
from typing import Sequence

import common

NAME = "e5_cache_sharing"
R = 16


def main(argv: Sequence[str] | None = None) -> int:
    args = common.parse_args(argv, __doc__)
    start = time.perf_counter()
    cfg, params = common.shared_run(args)
    r = 4 if args.smoke else R
    budgets = (1, 2, None) if args.smoke else (1, 2, 4, 8, None)
    examples = common.held_out_examples(args, cfg, 256)
    results = {b: common.generate_answers(params, cfg, examples, num_steps=r, cache_budget=b)
               for b in budgets}
    full = results[None]
    rows = [[b if b is not None else f"{r} (no sharing)", res["accuracy"],
             f"{res['cache_bytes'] / 1024:.0f}", f"{res['cache_bytes'] / full['cache_bytes']:.2f}",
             sum(a == c for a, c in zip(res["correct"], full["correct"])) / len(examples)]
            for b, res in results.items()]
    table = common.markdown_table(["budget (slots)", "accuracy", "cache KiB", "vs full cache",
                                   "agreement with full cache"], rows)

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    labels = [str(b) if b is not None else f"{r}\n(full)" for b in budgets]
    ax.plot(labels, [results[b]["accuracy"] for b in budgets], marker="o", label="accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("cache budget (recurrence slots per core layer)")
    ax.set_ylabel("accuracy")
    ax2 = ax.twinx()
    ax2.bar(labels, [results[b]["cache_bytes"] / 1024 for b in budgets], alpha=0.25,
            color="tab:orange", label="cache KiB")
    ax2.set_ylabel("cache KiB")
    ax.set_title(f"E5: KV-cache sharing at r = {r}")
    common.save_figure(fig, args, NAME)

    smallest = results[budgets[0]]
    verdict = (f"budget {budgets[0]}: accuracy {smallest['accuracy']:.3f} with "
               f"{smallest['cache_bytes'] / full['cache_bytes']:.0%} of the full cache's memory; "
               f"full cache {full['accuracy']:.3f}.")
    common.write_report(
        args, NAME, "E5: KV-cache sharing",
        claim="Sharing a small number of recurrence slots in the KV cache keeps accuracy while "
              "cache memory stops growing with r.",
        table=table, verdict=verdict, plot=f"{NAME}.png",
        data={"r": r, "rows": rows}, configs={"recurrent": cfg},
        wall=time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
