"""Continuous thought vs CoT, No-CoT and pause tokens on the ProsQA-style task (SPEC §2 table).

    python experiments/coconut_prosqa.py            # the full run (~20 minutes on a shared 2-core CPU)
    python experiments/coconut_prosqa.py --smoke    # < 60 s, for the test suite
    python experiments/coconut_prosqa.py --config configs/coconut-prosqa-symbols.yaml --backbones r1

Trains every method from configs/coconut-prosqa.yaml with the same budget of optimizer steps, on
two backbones — r = 1 (a plain 4-layer transformer: fixed single recurrence step, zero initial
state) and a recurrent-depth one (mean r = 2, sampled depth, truncated backprop; No-CoT
and Coconut only) — evaluates
greedy accuracy and generated tokens on held-out problems, and probes the continuous thoughts
with a logit lens: at thought j, how much probability the tied head puts on the first
character of the nodes at graph distance k = ⌈j / c⌉ (the search frontier of the step the thought
stands for, c thoughts per step) vs other nodes.

Writes experiments/results/<name>.{md,json,png}, <name> = the config's file name with "_" for
"-" (coconut_prosqa, coconut_prosqa_symbols). Runs resume from runs/<name>/ (a finished run is
only evaluated); pass --fresh to retrain.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]  # paths below work from any working directory
sys.path.insert(0, str(ROOT))
from rdlm.coconut import curriculum, generation, thoughts  # noqa: E402
from rdlm.cli.startup import with_malloc_tunables  # noqa: E402
from rdlm.data.render import parse_answer  # noqa: E402
from rdlm.data.tasks import (example_at, make_task, parse_prosqa, prosqa_distances,  # noqa: E402
                              prosqa_options)
from rdlm.data.tokenizer import load_tokenizer  # noqa: E402
from rdlm.runtime.hostinfo import machine  # noqa: E402
from rdlm.model import attention_context  # noqa: E402

DEFAULT_CONFIG = "configs/coconut-prosqa.yaml"  # relative to ROOT
METHODS = [  # (row label, overrides)
    ("CoT", ["coconut.method=cot"]),
    ("No-CoT", ["coconut.method=nocot"]),
    ("Coconut", ["coconut.method=coconut"]),
    ("pause as thought", ["coconut.method=pause"]),
    ("Coconut w/o curriculum", ["coconut.method=coconut", "coconut.curriculum=false"]),
]
BACKBONES = {  # (label, overrides)
    "r1": ("r = 1 (plain transformer)", ["model.mean_recurrence=1", "coconut.train_num_steps=1"]),
    "rd": ("recurrent depth (mean r = 2)", ["model.mean_recurrence=2", "model.backprop_depth=2",
                                            "coconut.train_num_steps=0",
                                            "coconut.eval_num_steps=3"]),
}
# The recurrent backbone costs ~2x per pass: within the CPU budget it runs No-CoT and Coconut.
RD_METHODS = ("No-CoT", "Coconut")
SMOKE = ["model.d_model=32", "model.mlp_dim=64", "coconut.steps_per_stage=1",
         "coconut.num_train_examples=16", "coconut.eval_examples=4", "train.batch_size=2",
         "coconut.max_new_tokens=6", "coconut.max_latent_stage=1"]


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Probe: logit lens of the thoughts over the graph's nodes.


def node_distances(question: str) -> tuple[str, dict[str, int], set[str]]:
    """(entity, BFS distance of every reachable node, all nodes) of a ProsQA question."""
    graph = parse_prosqa(question)
    nodes = {n for edge in graph.edges for n in edge}
    return graph.entity, prosqa_distances(question), nodes - {graph.entity}


def thought_probs(params, cfg, cc, examples) -> list[np.ndarray]:
    """Per example, [thoughts, vocab]: the tied head's distribution at each thought (the hidden
    state fed back as that thought), on the test-time prompt."""
    tok = load_tokenizer(cfg.data.tokenizer)
    r = int(curriculum.eval_depth(cfg, cc).n_no_grad)
    prompts = [curriculum.eval_prompt(e, tok, cc) for e in examples]
    width = max(map(len, prompts))
    buf = np.full((len(prompts), width), tok.pad_id, np.int32)  # right padding: causal, unseen
    for i, p in enumerate(prompts):
        buf[i, :len(p)] = p
    ctx = attention_context(cfg.model, len(prompts), width)
    state0 = jnp.zeros((len(prompts), width, cfg.model.d_model))
    x = jax.jit(lambda p, t: thoughts.fill_thought_bases(  # a thought's base: its hidden state
        p, t, cfg.model, ctx, state0, thoughts.Depth(jnp.int32(r), jnp.int32(0), 0),
        latent_id=tok.latent_id, max_latents=cc.max_latents,
        shift_sees_thoughts=cc.shift_sees_thoughts))(params, jnp.asarray(buf))
    out = []
    for prompt, x_td in zip(prompts, x):
        where = [i for i, t in enumerate(prompt) if t == tok.latent_id]
        logits = thoughts.head_logits(params, x_td[None, where], cfg.model)[0]
        out.append(np.asarray(jax.nn.softmax(logits, -1)))
    return out


def logit_lens(cfg, cc, examples, probs_per_example) -> dict[str, list[float]]:
    """Mean probability of a node's first character under the head applied to thought j, by the
    node's relation to the step k = ⌈j / c⌉ that thought j stands for: the frontier (distance k),
    nearer (< k), farther (> k), unreachable. ``probs_per_example``: `thought_probs`.
    """
    tok = load_tokenizer(cfg.data.tokenizer)
    groups = {"frontier (distance k)": [], "nearer (< k)": [], "farther (> k)": [],
              "unreachable": []}
    k_max = cc.max_latents
    sums = {g: np.zeros(k_max) for g in groups}
    counts = {g: np.zeros(k_max) for g in groups}
    for e, probs in zip(examples, probs_per_example):
        _, dist, nodes = node_distances(e.question)
        for k in range(len(probs)):  # thought k + 1 stands for step ⌈(k + 1) / c⌉ (hop that far)
            hop = k // cc.latents_per_step + 1
            for node in nodes:
                d = dist.get(node)
                group = ("unreachable" if d is None else "frontier (distance k)" if d == hop
                         else "nearer (< k)" if d < hop else "farther (> k)")
                sums[group][k] += float(probs[k, tok.encode(node[0])[0]])
                counts[group][k] += 1
    # An empty group (no node nearer than hop 1; none farther than the longest path) is NaN.
    return {g: np.where(counts[g] > 0, sums[g] / np.maximum(counts[g], 1), np.nan).tolist()
            for g in groups}


def path_probe(cfg, cc, examples, probs_per_example) -> dict[str, list]:
    """Does thought j hold the solution path? Mean probability of the path's i-th node (the
    target of step i; the last one is the answer) and of the wrong option at every thought, and
    the token the head most often ranks first there. ``probs_per_example``: `thought_probs`."""
    tok = load_tokenizer(cfg.data.tokenizer)
    first = lambda node: tok.encode(node)[0]
    rows: dict[str, list] = {}
    tops: list[collections.Counter] = [collections.Counter() for _ in range(cc.max_latents)]
    for e, probs in zip(examples, probs_per_example):
        path = [re.split(r"[> ]", step.rstrip("."))[-1] for step in e.steps]
        wrong = [o for o in prosqa_options(e.question) if o != e.answer][0]
        named = ([(f"path node {i + 1}", n) for i, n in enumerate(path[:-1])]
                 + [("the answer (last path node)", path[-1]), ("the other option", wrong)])
        for label, node in named:
            rows.setdefault(label, []).append(probs[:, first(node)])
        for j, p in enumerate(probs):
            tops[j][tok.decode([int(p.argmax())])] += 1
    out: dict[str, list] = {label: np.mean(v, axis=0).tolist() for label, v in rows.items()}
    out["most often first"] = [f"{t.most_common(1)[0][0]!r} ({t.most_common(1)[0][1]})"
                               for t in tops]
    return out


# ---------------------------------------------------------------------------------------------


def run(smoke: bool, fresh: bool, out_dir: Path, runs_dir: Path, config: str = DEFAULT_CONFIG,
        backbone_keys: tuple[str, ...] = tuple(BACKBONES),
        method_slugs: tuple[str, ...] | None = None) -> dict:
    t_start = time.time()
    backbones = {k: BACKBONES[k] for k in (("r1",) if smoke else backbone_keys)}
    methods = [METHODS[2]] if smoke else [  # smoke: one method keeps `make test` short
        m for m in METHODS if method_slugs is None or _slug(m[0]) in method_slugs]
    extra = SMOKE if smoke else []
    rows, probes, path_probes, configs = [], {}, {}, {}
    for bkey, (blabel, boverrides) in backbones.items():
        for mlabel, moverrides in methods:
            if bkey == "rd" and mlabel not in RD_METHODS:
                continue
            run_dir = runs_dir / bkey / _slug(mlabel)
            if fresh and run_dir.exists():
                shutil.rmtree(run_dir)
            overrides = [*boverrides, *moverrides, *extra, f"train.run_dir={run_dir}"]
            cfg, cc = curriculum.load_coconut_config(ROOT / config, overrides)
            configs[f"{bkey}/{mlabel}"] = overrides
            t0 = time.time()
            out = curriculum.train_coconut(cfg, cc, log=lambda m: print(f"[{bkey} {mlabel}] {m}",
                                                                    flush=True))
            # A resumed or already finished run: its history holds the training time of every call.
            train_s = out.train_seconds if out.history else time.time() - t0
            params = out.params
            task = make_task(cfg.data.task, cfg.data.difficulty, cfg.data.task_args)
            eval_examples = [example_at(task, cc.eval_split, i, cfg.seed)
                             for i in range(cc.eval_examples)]
            result = generation.evaluate_method(params, cfg, cc, eval_examples)
            final_loss = out.history[-1]["loss"] if out.history else float("nan")
            rows.append({"backbone": blabel, "method": mlabel, "accuracy": result["accuracy"],
                         "generated_tokens": result["generated_tokens"],
                         "eval_r": result["num_steps"], "train_steps": int(out.state.step),
                         "final_train_loss": final_loss, "train_s": train_s,
                         "eval_examples": result["num_examples"],
                         "option_rate": option_rate(eval_examples, result["predictions"]),
                         "sample_prediction": result["predictions"][0]})
            print(f"[{bkey} {mlabel}] accuracy {result['accuracy']:.3f} generated "
                  f"{result['generated_tokens']:.1f} ({train_s:.0f}s)", flush=True)
            if mlabel == "Coconut":
                probe_examples = [example_at(task, "test", i, cfg.seed)
                                  for i in range(4 if smoke else 128)]
                probs = thought_probs(params, cfg, cc, probe_examples)  # once, for both probes
                probes[blabel] = logit_lens(cfg, cc, probe_examples, probs)
                path_probes[blabel] = path_probe(cfg, cc, probe_examples, probs)
    wall = time.time() - t_start
    report = {"rows": rows, "probes": probes, "path_probes": path_probes, "overrides": configs,
              "wall_s": wall,
              "machine": machine(), "smoke": smoke, "fresh": fresh, "config_path": config,
              "backbones": list(backbones), "methods": [_slug(label) for label, _ in methods],
              "config": yaml.safe_load((ROOT / config).read_text())}
    write_outputs(report, out_dir, results_name(config))
    return report


def option_rate(examples: list, predictions: list[dict]) -> float:
    """Fraction of answers that name one of the question's two options ("is X a A or B?"),
    right or wrong: it tells a model that has not learned the answer format from one that
    answers the format but picks the wrong option (chance is 50 % of these)."""
    hits = 0
    for example, prediction in zip(examples, predictions):
        hits += (parse_answer(prediction["generated"].replace("<eos>", ""))
                 in prosqa_options(example.question))
    return hits / max(len(examples), 1)


def results_name(config: str) -> str:
    """experiments/results file stem of a config: configs/coconut-prosqa.yaml → coconut_prosqa."""
    return Path(config).stem.replace("-", "_")


def write_outputs(report: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    plot(report, out_dir / f"{name}.png")
    config, backbones, methods = report["config_path"], report["backbones"], report["methods"]
    lines = ["# Continuous thought on the ProsQA-style task", "",
             "Command: `python experiments/coconut_prosqa.py" + (" --smoke" if report["smoke"] else "")
             + (f" --config {config}" if config != DEFAULT_CONFIG else "")
             + (f" --backbones {','.join(backbones)}" if len(backbones) < len(BACKBONES)
                and not report["smoke"] else "")
             + (f" --methods {','.join(methods)}" if len(methods) < len(METHODS)
                and not report["smoke"] else "")
             + (" --fresh" if report.get("fresh", True) else "") + "` (resumable: without "
             "`--fresh` finished runs are evaluated, interrupted ones continue)  ",
             f"Machine: {report['machine']}.  ",
             f"Training time, all runs (their logged histories, across resumptions): "
             f"{sum(r['train_s'] for r in report['rows']) / 60:.1f} min; this invocation: "
             f"{report['wall_s'] / 60:.1f} min.",
             "", "Greedy decoding on held-out test problems; generated tokens = language tokens "
             "(incl. `<eos>`) + the k·c continuous thoughts (the paper's count).", "",
             "| backbone | method | accuracy % | answers an option % | generated tokens | train steps "
             "| final train loss | train s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['backbone']} | {r['method']} | {100 * r['accuracy']:.1f} | "
                     f"{100 * r.get('option_rate', float('nan')):.1f} | "
                     f"{r['generated_tokens']:.1f} | {r['train_steps']} | "
                     f"{r['final_train_loss']:.3f} | {r['train_s']:.0f} |")
    lines += ["", *reading(report["rows"])]
    lines += ["", "Shortcut heuristics (first option, degree, position) score 45–55% on this task "
              "(chance 50%; docs/data.md).", "", "## Probe (logit lens of the thoughts)", "",
              "Mean probability the tied head puts on the first character of a node at "
              "thought j (the hidden state fed back as the j-th thought), by the node's graph "
              "distance from the entity relative to the step k = ⌈j / c⌉ the thought stands for "
              f"(c thoughts per step); see `{name}.png`.", ""]
    for backbone, groups in report["probes"].items():
        lines.append(f"**{backbone}**")
        lines.append("")
        k = len(next(iter(groups.values())))
        lines.append("| group | " + " | ".join(f"thought {i + 1}" for i in range(k)) + " |")
        lines.append("|---|" + "---:|" * k)
        for g, values in groups.items():
            lines.append(f"| {g} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
        lines.append("")
    for backbone, probe in report.get("path_probes", {}).items():
        lines += [f"**{backbone}: the solution path in the thoughts**", "",
                  "Mean probability of each path node (the targets of the steps, in order) and "
                  "of the wrong option at thought j, and the token ranked first there most often "
                  "(count of problems):", ""]
        k = len(next(iter(probe.values())))
        lines.append("| | " + " | ".join(f"thought {i + 1}" for i in range(k)) + " |")
        lines.append("|---|" + "---:|" * k)
        for label, values in probe.items():
            cells = [v if isinstance(v, str) else f"{v:.3f}" for v in values]
            lines.append(f"| {label} | " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines += ["## Config", "", f"`{config}` with per-run overrides:", "", "```yaml",
              yaml.safe_dump(report["config"], sort_keys=False).rstrip(), "```", "", "```json",
              json.dumps(report["overrides"], indent=1), "```", ""]
    (out_dir / f"{name}.md").write_text("\n".join(lines))


def reading(rows: list[dict]) -> list[str]:
    """The paper's claim checked on the measured rows, per backbone: Coconut above No-CoT with
    far fewer generated tokens than CoT; then whether the answers beat a coin flip between the
    question's two options (accuracy among answers that name an option), and Coconut vs pause
    (same positions, no hidden state fed back)."""
    out = ["**Reading (computed from the table).**"]
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        by = {r["method"]: r for r in rows if r["backbone"] == backbone}
        coconut, nocot = by.get("Coconut"), by.get("No-CoT")
        if coconut is None or nocot is None:
            continue
        parts = [f"{backbone}: Coconut {100 * coconut['accuracy']:.1f} % vs No-CoT "
                 f"{100 * nocot['accuracy']:.1f} % — "
                 + ("beats it" if coconut["accuracy"] > nocot["accuracy"] else "does not beat it")]
        if "CoT" in by:
            cot = by["CoT"]
            parts.append(f"{coconut['generated_tokens']:.1f} generated tokens vs CoT's "
                         f"{cot['generated_tokens']:.1f} ({100 * cot['accuracy']:.1f} %)")
        if "pause as thought" in by:
            pause = by["pause as thought"]
            parts.append(f"pause as thought {100 * pause['accuracy']:.1f} % "
                         + ("(equal: the fed-back state adds nothing measurable)"
                            if abs(pause["accuracy"] - coconut["accuracy"]) < 1e-9 else ""))
        among = [f"{m} {100 * r['accuracy'] / r['option_rate']:.0f} %" for m, r in by.items()
                 if r.get("option_rate")]
        parts.append("accuracy among answers that name an option (coin flip = 50 %): "
                     + ", ".join(among))
        out.append("- " + "; ".join(parts) + ".")
    out.append("")
    out.append("Where the accuracy among option answers stays near 50 %, no method has learned "
               "the search yet: a lead in accuracy then comes from answering in the format "
               "(naming an option at all), which the curriculum's language stages teach.")
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    probes = report["probes"]
    fig, axes = plt.subplots(1, max(len(probes), 1) + 1, figsize=(5 * (len(probes) + 1), 4))
    ax = axes[0]
    for backbone in dict.fromkeys(r["backbone"] for r in report["rows"]):
        rs = [r for r in report["rows"] if r["backbone"] == backbone]
        ax.scatter([r["generated_tokens"] for r in rs], [100 * r["accuracy"] for r in rs],
                   label=backbone)
        for r in rs:
            ax.annotate(r["method"], (r["generated_tokens"], 100 * r["accuracy"]), fontsize=7)
    ax.axhline(50, color="gray", ls=":", lw=1)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("accuracy %")
    ax.legend(fontsize=7)
    ax.set_title("ProsQA-style: accuracy vs tokens")
    for ax, (backbone, groups) in zip(axes[1:], probes.items()):
        for g, values in groups.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", label=g)
        ax.set_xlabel("thought j (step ⌈j / c⌉)")
        ax.set_ylabel("p(first char of node)")
        ax.set_title(f"logit lens, Coconut, {backbone}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run (< 60 s) for tests")
    parser.add_argument("--fresh", action="store_true", help="retrain instead of resuming")
    parser.add_argument("--out", default=None, help="output folder (default experiments/results;"
                        " smoke runs default to runs/coconut_prosqa_smoke)")
    parser.add_argument("--runs", default=None, help="run directories (default runs/...)")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"coconut config, relative to the repository (default {DEFAULT_CONFIG})")
    parser.add_argument("--backbones", default=",".join(BACKBONES),
                        help=f"comma list of {sorted(BACKBONES)} (default all)")
    slugs = [_slug(label) for label, _ in METHODS]
    parser.add_argument("--methods", default=None,
                        help=f"comma list of {slugs} (default all)")
    args = parser.parse_args(argv)
    if argv is None:  # run as a script: huge pages for XLA's temporaries, as `python -m rdlm`
        with_malloc_tunables()
    keys = tuple(k.strip() for k in args.backbones.split(",") if k.strip())
    unknown = [k for k in keys if k not in BACKBONES]
    if unknown or not keys:
        parser.error(f"--backbones {args.backbones!r}: choose from {sorted(BACKBONES)}")
    chosen = None
    if args.methods is not None:
        chosen = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        if not chosen or any(m not in slugs for m in chosen):
            parser.error(f"--methods {args.methods!r}: choose from {slugs}")
    if not (ROOT / args.config).is_file():
        parser.error(f"--config {args.config!r}: no such file under {ROOT}")
    name = results_name(args.config)
    tag = f"{name}_smoke" if args.smoke else name
    out = Path(args.out or ROOT / (f"runs/{tag}" if args.smoke else "experiments/results"))
    runs = Path(args.runs or ROOT / f"runs/{tag}")
    report = run(args.smoke, args.fresh, out, runs, args.config, keys, chosen)
    print(f"wrote {out / (name + '.md')} in {report['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
