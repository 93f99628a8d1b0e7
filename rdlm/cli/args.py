"""Argument types shared by the command-line programs."""

from __future__ import annotations

import argparse

from rdlm.generation import SpeculativeConfig


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")


def speculative_arg(text: str) -> SpeculativeConfig:
    """``K`` or ``K:DRAFT_STEPS`` (draft K tokens with DRAFT_STEPS iterations each)."""
    k, _, steps = text.partition(":")
    try:
        return SpeculativeConfig(num_draft=int(k), draft_steps=int(steps) if steps else 4)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--speculative {text!r}: {err}")
