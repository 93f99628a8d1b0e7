"""rdlm against the original PyTorch implementation, same weights, same machine.

    python benchmarks/compare_original.py --code-from DIR --torch-python PYTHON \\
        [--config configs/bench-28m.yaml] [--out results/compare-original-28m-cpu.json]

``DIR`` holds the original modelling code as released next to the Huginn-0125 weights
(``raven_config_minimal.py``, ``raven_modeling_minimal.py``); ``PYTHON`` is an interpreter with
``torch`` and ``transformers`` (4.4x, the version that code was written for). Neither is an rdlm
dependency, and nothing is downloaded.

The script initialises the config's model (key 0), writes it in the Huginn format with
`rdlm.interop.save_huginn`, and times on both sides, with every CPU thread:

- generation: a 32-token prompt, 64 greedy new tokens from the zero state at r = 32, batch 1 and
  16 (the original: Hugging Face ``generate`` with ``num_steps=32, init_scale=0``), and whether the
  greedy tokens agree;
- one training step (loss, backward, global-norm clipping, AdamW) at the config's depth split
  (n_no_grad + n_grad = mean recurrence) and batch.

Like ``python -m rdlm``, the script re-executes itself with ``GLIBC_TUNABLES`` asking malloc for
transparent huge pages (`rdlm.cli.startup.with_malloc_tunables`); the PyTorch side inherits the same
environment (it makes no difference to its step time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rdlm  # noqa: E402
from rdlm.bench.train import bench_train  # noqa: E402
from rdlm.cli.startup import with_malloc_tunables  # noqa: E402
from rdlm.config_files import load_config  # noqa: E402
from rdlm.interop import save_huginn  # noqa: E402
from rdlm.runtime.hostinfo import host_info  # noqa: E402

CODE_FILES = ("raven_config_minimal.py", "raven_modeling_minimal.py")

# Runs under the PyTorch interpreter: times the original model on the exported directory.
TORCH_SIDE = r'''
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

job = json.load(open(sys.argv[1]))
torch.set_num_threads(os.cpu_count())
model = AutoModelForCausalLM.from_pretrained(job["model_dir"], trust_remote_code=True,
                                             torch_dtype=torch.float32)
import transformers
result = {"torch": torch.__version__, "transformers": transformers.__version__,
          "threads": torch.get_num_threads()}
gen_config = GenerationConfig(max_new_tokens=job["new_tokens"], min_new_tokens=job["new_tokens"],
                              use_cache=True, do_sample=False, temperature=None, top_k=None,
                              top_p=None, eos_token_id=None, bos_token_id=None, pad_token_id=0)
model.eval()
for name, prompts in job["prompts"].items():
    ids = torch.tensor(prompts)
    times = []
    for _ in range(job["repeats"] + 1):  # the first call warms up
        start = time.perf_counter()
        out = model.generate(ids, gen_config, num_steps=job["num_steps"], init_scale=0.0)
        times.append(time.perf_counter() - start)
    result[name] = {"seconds": min(times[1:]), "tokens": out[:, ids.shape[1]:].tolist()}

model.train()
tokens = torch.tensor(job["train_tokens"])
inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
depth = (torch.tensor(job["n_no_grad"]), torch.tensor(job["n_grad"]))

def train_step():
    opt.zero_grad(set_to_none=True)
    loss = model(inputs, labels=targets, num_steps=depth).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

times = []
for _ in range(job["repeats"] + 1):
    start = time.perf_counter()
    train_step()
    times.append(time.perf_counter() - start)
result["train_step_s"] = sorted(times[1:])[len(times[1:]) // 2]
print("RESULT " + json.dumps(result))
'''


def _time_generate(params, cfg, prompts, num_steps, new_tokens, repeats):
    kwargs = dict(max_new_tokens=new_tokens, num_steps=num_steps, cache_budget=num_steps)
    out = rdlm.generate(params, cfg, prompts, **kwargs)  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = rdlm.generate(params, cfg, prompts, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times), out.tokens.tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code-from", required=True, help="directory with the original "
                        "raven_config_minimal.py and raven_modeling_minimal.py")
    parser.add_argument("--torch-python", required=True,
                        help="a Python interpreter with torch and transformers")
    parser.add_argument("--config", default=str(ROOT / "configs" / "bench-28m.yaml"))
    parser.add_argument("--num-steps", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    missing = [n for n in CODE_FILES if not (Path(args.code_from) / n).is_file()]
    if missing:
        parser.error(f"--code-from {args.code_from} lacks {', '.join(missing)}")

    cfg = load_config(args.config, [])
    model_cfg = cfg.model
    if model_cfg.dtype != "float32":
        parser.error("compare in float32 (the original trains and generates in the weights' dtype)")
    params = jax.jit(lambda k: rdlm.init_params(model_cfg, k))(jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = {f"batch_{b}": rng.integers(0, model_cfg.vocab_size, (b, 32)).tolist()
               for b in (1, 16)}
    k = model_cfg.backprop_depth
    n_no_grad, n_grad = max(model_cfg.mean_recurrence - k, 0), min(k, model_cfg.mean_recurrence)
    batch, seq = cfg.train.batch_size, cfg.train.seq_len

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_huginn(model_cfg, params, Path(tmp) / "model", dtype="float32",
                                extra_files={n: Path(args.code_from) / n for n in CODE_FILES})
        job = {"model_dir": str(model_dir), "prompts": prompts, "num_steps": args.num_steps,
               "new_tokens": args.new_tokens, "repeats": args.repeats,
               "train_tokens": rng.integers(0, model_cfg.vocab_size, (batch, seq + 1)).tolist(),
               "n_no_grad": n_no_grad, "n_grad": n_grad}
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(job))
        print("timing the original implementation …", flush=True)
        proc = subprocess.run([args.torch_python, "-c", TORCH_SIDE, str(job_path)],
                              capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)
        print("the PyTorch side failed (see above)", file=sys.stderr)
        return 1
    original = json.loads(lines[-1][len("RESULT "):])

    print("timing rdlm …", flush=True)
    ours = {}
    for name, rows in prompts.items():
        seconds, tokens = _time_generate(params, model_cfg, rows, args.num_steps, args.new_tokens,
                                         args.repeats)
        ours[name] = {"seconds": seconds, "tokens": tokens}
    bench = bench_train(cfg, (), steps=args.repeats, warmup=1)
    ours["train_step_s"] = bench["results"][0]["step_s"]

    report = {"config": os.path.relpath(args.config, ROOT), "num_steps": args.num_steps, "new_tokens": args.new_tokens,
              "train_depth": [n_no_grad, n_grad], "train_batch": [batch, seq],
              **host_info(), "jax": jax.__version__, "torch": original["torch"],
              "transformers": original["transformers"], "rows": []}
    print(f"\n{'':<34}{'original':>12}{'rdlm':>12}{'rdlm / original':>17}")
    for name, rows in prompts.items():
        n_tokens = len(rows) * args.new_tokens
        theirs_tps = n_tokens / original[name]["seconds"]
        ours_tps = n_tokens / ours[name]["seconds"]
        same = float(np.mean(np.asarray(original[name]["tokens"])
                             == np.asarray(ours[name]["tokens"])))
        label = f"generate r={args.num_steps} {name.replace('_', ' ')} tok/s"
        print(f"{label:<34}{theirs_tps:>12.2f}{ours_tps:>12.2f}{ours_tps / theirs_tps:>16.2f}x"
              f"   greedy tokens equal: {same:.0%}")
        report["rows"].append({"what": label, "original": theirs_tps, "rdlm": ours_tps,
                               "greedy_tokens_equal": same})
    tokens = batch * seq
    theirs_tps, ours_tps = tokens / original["train_step_s"], tokens / ours["train_step_s"]
    label = f"train r={n_no_grad}+{n_grad} tok/s"
    print(f"{label:<34}{theirs_tps:>12.1f}{ours_tps:>12.1f}{ours_tps / theirs_tps:>16.2f}x")
    report["rows"].append({"what": label, "original": theirs_tps, "rdlm": ours_tps})
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    with_malloc_tunables()  # as `python -m rdlm` does; the PyTorch side inherits it too
    sys.exit(main())
