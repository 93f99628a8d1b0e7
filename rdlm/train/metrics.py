"""Logging: metrics.jsonl, TensorBoard, a progress bar or plain lines. Process 0 only."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

import yaml

from rdlm.config import Config
from rdlm.config_files import to_dict
from rdlm.data.tokenizer import BUILTIN_ALPHABETS, RUN_TOKENIZER, tokenizer_file
from rdlm.errors import ConfigError
from rdlm.runtime import storage
from rdlm.runtime.storage import StoragePath


def read_metrics(path: str | StoragePath) -> list[dict[str, Any]]:
    """The step records of a metrics.jsonl ([] if there is none), skipping a line that a killed
    writer left half-written."""
    path = storage.as_path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn line from a killed writer
        records.append(record)
    return records


def truncate_jsonl(path: StoragePath, start_step: int) -> list[dict[str, Any]]:
    """Keep the records of steps <= start_step: a resumed run re-logs the steps after its
    checkpoint, and a SIGKILL may have left half a line at the end. Returns the kept records."""
    if not path.exists():
        return []
    kept = [r for r in read_metrics(path) if r["step"] <= start_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 3e-4, …}``: the scalar leaves TensorBoard's hparams view can show."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        elif value is not None:
            flat[name] = str(value)
    return flat


def record_run_inputs(run_dir: StoragePath, cfg: Config) -> str:
    """Keep what the run needs to be used later in its directory: ``config.yaml`` (the resolved
    config, rewritten at every start) and, when the data was tokenized with a tokenizer.json, a
    copy of it, so that sampling, eval and export find it without flags. Returns the YAML."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    (run_dir / "config.yaml").write_text(text)
    spec = cfg.data.tokenizer
    if spec in BUILTIN_ALPHABETS:
        return text
    try:
        source = tokenizer_file(spec)
    except FileNotFoundError as err:
        raise ConfigError(f"data.tokenizer: {err}") from err
    kept = run_dir / RUN_TOKENIZER
    if not kept.exists():
        storage.copy_file(source, kept)
    elif kept.read_bytes() != source.read_bytes():
        raise ConfigError(f"data.tokenizer {str(source)!r} differs from the tokenizer this run "
                          f"was started with ({str(kept)!r}); resume with that one, or start a "
                          "new train.run_dir for a new tokenizer.")
    return text


class MetricsLogger:
    """metrics.jsonl, TensorBoard event files and a progress bar (or plain lines); process 0.

    Messages before `open` (restore, init) go straight to ``printer`` (default: stdout)."""

    def __init__(self, run_dir: StoragePath, cfg: Config, enabled: bool,
                 printer: Callable[[str], None] | None = None):
        self.enabled = enabled
        self.printer = printer
        self.run_dir = run_dir
        self.cfg = cfg
        self.bar = None
        self.opened = False

    def open(self, start_step: int) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.run_dir / "metrics.jsonl", start_step)
        self.jsonl = storage.AppendedText(self.run_dir / "metrics.jsonl")
        # purge_step hides events a killed run wrote past the checkpoint we resume from.
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"),
                                purge_step=start_step + 1 if start_step else None)
        self.opened = True
        cfg = self.cfg
        config_yaml = record_run_inputs(self.run_dir, cfg)
        if not start_step:
            self.tb.add_text("config", "```yaml\n" + config_yaml + "```", 0)
            self.tb.add_hparams(flat_hparams(to_dict(cfg)), {}, name="hparams")
        mode = cfg.train.progress
        # A caller that takes the messages (``printer``) gets lines unless it asks for the bar.
        if mode == "bar" or (mode == "auto" and self.printer is None and sys.stderr.isatty()):
            self.bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step",
                            dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float], *, print_line: bool) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if "loss" in metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                                     mfu=f"{metrics.get('mfu', 0):.1%}", r=metrics.get("r"))
        elif print_line:
            self.message(format_line(step, self.cfg.train.steps, metrics))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.printer is not None:
            self.printer(text)
        elif self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.opened:
            return
        if self.bar is not None:
            self.bar.close()
        self.tb.close()
        self.jsonl.close()


def plain(v: Any) -> Any:
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def format_line(step: int, total: int, m: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, fmt in (("stage", "stage {}"), ("loss", "loss {:.4f}"), ("grad_norm", "gnorm {:.3f}"), ("lr", "lr {:.2e}"),
                     ("r", "r {}"), ("tokens_per_s", "{:,.0f} tok/s"), ("mfu", "mfu {:.1%}"),
                     ("eta_s", "eta {:.0f}s")):
        if key in m:
            parts.append(fmt.format(m[key]))
    evals = [f"r{k.rsplit('_r', 1)[1]} {v:.4f}" for k, v in m.items() if k.startswith("eval/loss_r")]
    if evals:
        parts.append("eval " + " ".join(evals))
    return " | ".join(parts)



def plain_dict(d: dict[str, jax.Array]) -> dict[str, float]:
    return {k: plain(v) for k, v in jax.device_get(d).items()}


def closing_summary(history: list[dict[str, Any]], status: str, checkpoint: str | None,
                    wall_s: float) -> str:
    """The run's last word: final loss, the last held-out eval, where the checkpoint is, and
    the wall time of this call."""
    if not history:
        return f"{status}: no steps run"
    last = history[-1]
    evals = next(({k: v for k, v in h.items() if k.startswith("eval/")}
                  for h in reversed(history) if any(k.startswith("eval/") for k in h)), {})
    parts = [f"{status} at step {last['step']}", f"loss {last['loss']:.4f}"]
    if evals:
        parts.append("eval " + ", ".join(f"r={k.rsplit('_r', 1)[1]} {v:.4f}"
                                         for k, v in evals.items()))
    parts.append(f"checkpoint {checkpoint}" if checkpoint else "no checkpoint saved")
    parts.append(f"{wall_s:.0f} s")
    return " | ".join(parts)
