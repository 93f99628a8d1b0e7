"""E0 — language modelling on real text: held-out loss vs r of a small recurrent-depth LM, against
its fixed-depth twin with the same parameters.

    python experiments/e0_language_modelling.py            # ~45 min on a 2-core CPU; runs are reused
    python experiments/e0_language_modelling.py --smoke    # seconds, for the test suite

The corpus is text every machine with this Python already has: the documentation of standard-
library modules as `pydoc` renders it (one document per module), plus the licence texts the
operating system ships under /usr/share/common-licenses when it has them. Sources, sizes and a
hash of the corpus are recorded. The path is the user's: `rdlm prepare` (a 2,048-token BPE trained
on the training documents, 5 % of the documents held out by a hash of their text), `rdlm train`
on configs/text-small.yaml, then the held-out loss at each r.
"""

from __future__ import annotations

import collections
import hashlib
import json
import pydoc
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import common
from rdlm.data.prepare import prepare
from rdlm.data.tokenizer import load_tokenizer
from rdlm.generation import generate
from rdlm.train.eval import held_out_loss

NAME = "e0_language_modelling"
CONFIG = common.ROOT / "configs" / "text-small.yaml"
STEPS = (1, 2, 4, 8, 16, 32, 64)
TIE_NATS = 0.01  # a loss difference below this is called a tie
# Pure-Python standard-library modules without side effects on import, in a fixed order.
MODULES = (
    "abc argparse ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmd code codecs "
    "codeop collections colorsys compileall concurrent.futures configparser contextlib "
    "contextvars copy copyreg csv ctypes dataclasses datetime decimal difflib dis doctest email "
    "email.message email.parser enum filecmp fileinput fnmatch fractions ftplib functools gc "
    "getopt getpass gettext glob graphlib gzip hashlib heapq hmac html html.parser http "
    "http.client http.server imaplib importlib importlib.metadata inspect io ipaddress itertools "
    "json keyword linecache locale logging logging.handlers lzma mailbox math mimetypes "
    "multiprocessing netrc numbers operator optparse os os.path pathlib pdb pickle pickletools "
    "pkgutil platform plistlib poplib pprint profile pstats py_compile pyclbr queue quopri "
    "random re reprlib rlcompleter runpy sched secrets select selectors shelve shlex shutil "
    "signal site smtplib socket socketserver sqlite3 ssl stat statistics string stringprep "
    "struct subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time "
    "timeit token tokenize trace traceback tracemalloc types typing unicodedata unittest "
    "unittest.mock urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom "
    "xml.etree.ElementTree xml.sax zipfile zipimport zlib zoneinfo").split()
LICENSES = Path("/usr/share/common-licenses")
# The committed results' setting: 700 steps (~26 min for the recurrent run on 2 cores).
FULL = ["train.steps=700", "train.checkpoint_every=100"]
SMOKE_MODULES = ("abc", "bisect", "colorsys", "copy", "fnmatch", "heapq", "keyword", "shlex",
                 "string", "textwrap")
SMOKE = ["model.d_model=32", "model.n_heads=2", "model.mlp_dim=64", "model.max_seq_len=64",
         "sample.max_new_tokens=4",
         "train.seq_len=32", "train.batch_size=4", "train.steps=2", "train.warmup_steps=1",
         "train.checkpoint_every=0", "train.eval_every=0", "train.log_every=1",
         "train.progress=lines", "model.vocab_size=320"]


def documents(smoke: bool) -> list[dict[str, str]]:
    """``{"source", "text"}`` per document: each module's pydoc page, then each licence."""
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of old modules
        for name in SMOKE_MODULES if smoke else MODULES:
            try:
                text = pydoc.render_doc(name, renderer=pydoc.plaintext)
            except (ImportError, pydoc.ErrorDuringImport):
                continue  # a module this build of Python lacks
            # The FILE section names this machine's install path: drop it, keep the prose.
            text = "\n".join(line for line in text.splitlines() if "site-packages" not in line
                             and "/lib/python" not in line)
            docs.append({"source": f"pydoc:{name}", "text": text})
    if not smoke and LICENSES.is_dir():
        for path in sorted(LICENSES.iterdir()):
            if path.is_file():
                docs.append({"source": str(path), "text": path.read_text(errors="replace")})
    return docs


def build_data(args: Any) -> tuple[Path, dict[str, Any]]:
    """Corpus → JSONL → `prepare` (BPE + held-out split); returns (data dir, corpus record)."""
    data = Path(args.runs) / ("e0-data-smoke" if args.smoke else "e0-data")
    record = data / "corpus.json"
    if record.is_file():
        return data, json.loads(record.read_text())
    docs = documents(args.smoke)
    data.mkdir(parents=True, exist_ok=True)
    jsonl = data / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps(d) + "\n" for d in docs))
    meta = prepare([str(jsonl)], tokenizer="bpe:320" if args.smoke else "bpe:2048",
                   output=str(data), test_fraction=0.2 if args.smoke else 0.05)
    corpus = {"documents": len(docs), "characters": sum(len(d["text"]) for d in docs),
              "sha256": hashlib.sha256(jsonl.read_bytes()).hexdigest(),
              "sources": [d["source"] for d in docs],
              "splits": {k: {"documents": v["documents"], "tokens": v["tokens"]}
                         for k, v in meta.items()}}
    record.write_text(json.dumps(corpus, indent=1))
    return data, corpus


def run_configs(args: Any, data: Path) -> dict[str, Any]:
    paths = [f"data.paths={data}/{{split}}-*.npy", f"data.tokenizer={data}/tokenizer.json"]
    extra = SMOKE if args.smoke else FULL
    runs = {"recurrent": [], "fixed-depth twin": ["train.depth=fixed", "model.mean_recurrence=1",
                                                  "model.backprop_depth=1"]}
    out = {}
    for label, overrides in runs.items():
        run = "e0-" + label.split()[0] + ("-smoke" if args.smoke else "")
        out[label] = common.load_config(CONFIG, [*paths, *extra, *overrides, *args.overrides,
                                                 f"train.run_dir={Path(args.runs) / run}"])
    return out


def samples(params: Any, cfg: Any, prompts: Sequence[str], steps: Sequence[int]) -> dict:
    """Greedy continuations of each prompt at each r."""
    tok = load_tokenizer(cfg.data.tokenizer)
    return {r: generate(params, cfg.model, list(prompts), tokenizer=tok, num_steps=r,
                        max_new_tokens=cfg.sample.max_new_tokens).texts for r in steps}


def exit_profile(params: Any, cfg: Any, prompts: Sequence[str], cap: int) -> dict[str, Any]:
    """Under KL exit (cap ``cap``): mean iterations per generated token, and the tokens that took
    the most and the fewest (tokens seen at least 3 times)."""
    tok = load_tokenizer(cfg.data.tokenizer)
    out = generate(params, cfg.model, list(prompts), tokenizer=tok, num_steps=cap,
                   exit="kl:5e-4", max_new_tokens=cfg.sample.max_new_tokens,
                   temperature=0.8, key=__import__("jax").random.key(0))
    by_token: dict[str, list[int]] = collections.defaultdict(list)
    for i, ids in enumerate(out.rows()):
        for t, token in enumerate(ids):
            by_token[tok.decode([token])].append(int(out.steps[i, t]))
    means = {k: sum(v) / len(v) for k, v in by_token.items() if len(v) >= 3}
    ranked = sorted(means.items(), key=lambda kv: -kv[1])
    return {"mean_steps": out.mean_steps, "cap": cap, "most": ranked[:10], "fewest": ranked[-10:]}


def held_out_prompts(data: Path, count: int, words: int = 5) -> list[str]:
    """The first words of the first held-out documents' lines: prompts the model never saw."""
    tok = load_tokenizer(data / "tokenizer.json")
    import numpy as np
    stream = np.load(next(iter(sorted(data.glob("test-*.npy")))))
    # Past the first page: every pydoc page opens with the same boilerplate paragraph, which
    # the training pages hold too.
    start = min(len(stream) // 3, 20_000)
    text = tok.decode(stream[start:start + 8000].tolist(), skip_special_tokens=True)
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip().split()) >= 6
             and "automatically" not in ln]
    picked = lines[::max(1, len(lines) // count)][:count]
    return [" ".join(ln.split()[:words]) for ln in picked]


def main(argv: Sequence[str] | None = None) -> int:
    args = common.parse_args(argv, __doc__)
    start = time.perf_counter()
    data, corpus = build_data(args)
    configs = run_configs(args, data)
    trained = {label: common.trained(cfg, args.fresh)[:2] for label, cfg in configs.items()}
    steps = (1, 2, 4) if args.smoke else STEPS
    batches = 2 if args.smoke else 64
    curves = {label: held_out_loss(params, cfg, num_steps_list=steps, num_batches=batches)
              for label, (cfg, params) in trained.items()}
    rec_cfg, rec_params = trained["recurrent"]
    mean_r = rec_cfg.model.mean_recurrence
    prompts = held_out_prompts(data, 2 if args.smoke else 4, 2 if args.smoke else 5)
    texts = samples(rec_params, rec_cfg, prompts, (1, mean_r))
    profile = exit_profile(rec_params, rec_cfg, prompts * (1 if args.smoke else 4), 4 * mean_r)

    rec, twin = curves["recurrent"]["loss"], curves["fixed-depth twin"]["loss"]
    rows = [[r, rec[r], twin[r]] for r in steps]
    table = common.markdown_table(["r", "recurrent (held-out loss)", "fixed-depth twin"], rows)
    table += (f"\n\nHeld-out tokens per r: {curves['recurrent']['tokens']:,}. Corpus: "
              f"{corpus['documents']} documents, {corpus['characters']:,} characters, sha256 "
              f"`{corpus['sha256'][:16]}…`; splits {corpus['splits']}.")
    table += "\n\n**Samples (greedy, held-out prompts).**\n"
    for i, prompt in enumerate(prompts):
        for r in (1, mean_r):
            table += f"\n- r = {r}: `{prompt}` → `{texts[r][i]!r}`"
    table += (f"\n\n**KL exit** (threshold 5e-4, cap {profile['cap']}): "
              f"{profile['mean_steps']:.2f} iterations per token on average. Most iterations: "
              + ", ".join(f"`{t!r}` {s:.1f}" for t, s in profile["most"])
              + ". Fewest: " + ", ".join(f"`{t!r}` {s:.1f}" for t, s in profile["fewest"]) + ".")

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(steps, [rec[r] for r in steps], marker="o", label="recurrent (trained mean "
            f"r = {mean_r})")
    ax.axhline(twin[1], color="gray", ls="--", label="fixed-depth twin (r = 1)")
    ax.axvline(mean_r, color="gray", ls=":", lw=1)
    common.loss_vs_r_axes(ax, steps, "E0: held-out loss vs r on real text")
    plot = common.save_figure(fig, args, NAME)

    best_r = min(rec, key=rec.get)
    falls = rec[mean_r] < rec[1]
    blows_up = max(rec[r] for r in steps if r >= mean_r) > rec[mean_r] + 0.05
    margin = twin[1] - rec[mean_r]
    # One seed per model: differences this small are not distinguishable from a reseed.
    beats = "beats" if margin > TIE_NATS else ("loses to" if margin < -TIE_NATS else
                                                f"ties with (within {TIE_NATS} nats)")
    verdict = (f"Loss {'falls' if falls else 'does not fall'} from r = 1 ({rec[1]:.3f}) to the "
               f"training mean r = {mean_r} ({rec[mean_r]:.3f}); past it the loss "
               f"{'rises by more than 0.05 nats' if blows_up else 'stays within 0.05 nats'} "
               f"(r = {steps[-1]}: {rec[steps[-1]]:.3f}; best r = {best_r}). The recurrent model "
               f"{beats} its fixed-depth twin at equal parameters ({rec[mean_r]:.3f} vs "
               f"{twin[1]:.3f}, margin {margin:+.3f} nats, one seed each; the twin's step costs "
               f"about 1/{rec_cfg.model.effective_depth / (rec_cfg.model.n_prelude + rec_cfg.model.n_core + rec_cfg.model.n_coda):.1f} "
               "of the recurrent one's compute at the mean r). The twin's column beyond r = 1 "
               "runs a model trained at r = 1 deeper, for reference.")
    common.write_report(
        args, NAME, "E0 — language modelling on real text",
        claim="Held-out loss falls as r grows towards the training mean and does not blow up "
              "beyond it; the recurrent model beats its same-parameter fixed-depth twin.",
        table=table, verdict=verdict,
        data={"loss": {label: {str(r): v for r, v in c["loss"].items()}
                       for label, c in curves.items()},
              "corpus": corpus, "samples": {str(r): t for r, t in texts.items()},
              "prompts": prompts, "kl_exit": profile},
        configs=configs, wall=time.perf_counter() - start, plot=plot.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
