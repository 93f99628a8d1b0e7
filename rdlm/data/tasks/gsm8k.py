"""(e) GSM8k-Aug files supplied by the user, read into the same `Example` form."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rdlm.data.tasks.base import Example


def parse_gsm8k_aug_line(line: str) -> Example:
    """``question||<<step>> <<step>> #### answer`` → Example (steps without the << >>)."""
    if "||" not in line or "####" not in line:
        raise ValueError(f"not a GSM8k-Aug line (want 'question||<<step>> ... #### answer'): "
                         f"{line[:80]!r}")
    question, rest = line.split("||", 1)
    reasoning, answer = rest.rsplit("####", 1)
    steps = tuple(s.strip() for s in re.findall(r"<<(.*?)>>", reasoning))
    return Example(question.strip(), steps, answer.strip())


def load_gsm8k_aug(path: str | Path) -> list[Example]:
    """Read a GSM8k-Aug file: the ``||``/``####`` text format, or JSON / JSONL records with
    ``question``, ``steps`` (list) and ``answer`` (the format of the Coconut release)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSM8k-Aug file {str(path)!r} does not exist.")
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    elif stripped.startswith("{"):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        return [parse_gsm8k_aug_line(line) for line in text.splitlines() if line.strip()]
    return [Example(str(r["question"]).strip(), tuple(str(s).strip("<> ") for s in r["steps"]),
                    str(r["answer"]).strip()) for r in records]
