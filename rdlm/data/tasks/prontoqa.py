"""(d) ProntoQA-style k-hop logic over fictional ontologies: "true or false: tom is red?" with
distractor chains of the opposite polarity, and answer heuristics that do not follow the chain."""

from __future__ import annotations

import dataclasses
import random
from typing import Callable

from rdlm.data.tasks.base import Example, positive_knobs, require_knob
from rdlm.data.tasks.words import CONCEPTS, ENTITIES, PROPERTIES


@dataclasses.dataclass(frozen=True)
class ProntoQAParams:
    """The entity is a c_0, every c_i is a c_{i+1} (``hops`` in [min_hops, max_hops]), and the
    last concept has a property; ``distractors`` other chains of concepts carry the property
    too (the first with the opposite polarity, the others at random), so the answer needs the
    entity's own chain. Answer: true/false."""

    min_hops: int = 5
    max_hops: int = 5
    distractors: int = 1
    shuffle_facts: bool = True

    def __post_init__(self) -> None:
        positive_knobs(self, "min_hops", "max_hops")
        require_knob(self.min_hops <= self.max_hops <= 12, "max_hops", self.max_hops,
                       f"must be in [min_hops={self.min_hops}, 12]")
        require_knob(isinstance(self.distractors, int) and 1 <= self.distractors <= 3,
                       "distractors", self.distractors,
                       "must be in [1, 3] (without one the property alone gives the answer)")


@dataclasses.dataclass(frozen=True)
class ProntoQATask:
    params: ProntoQAParams = ProntoQAParams()
    name: str = "prontoqa"

    def generate(self, rng: random.Random) -> Example:
        p = self.params
        hops = rng.randint(p.min_hops, p.max_hops)
        lengths = [hops] + [rng.randint(p.min_hops, p.max_hops) for _ in range(p.distractors)]
        concepts = rng.sample(CONCEPTS, sum(n + 1 for n in lengths))
        entity, prop = rng.choice(ENTITIES), rng.choice(PROPERTIES)
        has_prop = rng.random() < 0.5
        blocks, start = [], 0
        chain: list[str] = []
        for k, n in enumerate(lengths):
            chain_k = concepts[start:start + n + 1]
            start += n + 1
            # One distractor contradicts the entity's chain; further ones are random, so that
            # neither the majority nor the minority polarity gives the answer away.
            positive = has_prop if k == 0 else (not has_prop if k == 1 else rng.random() < 0.5)
            blocks.append([f"every {a} is a {b}." for a, b in zip(chain_k, chain_k[1:])]
                          + [f"every {chain_k[-1]} is {'' if positive else 'not '}{prop}."])
            chain = chain if k else chain_k
        rng.shuffle(blocks)  # in order or not, the entity's chain has no fixed place
        facts = [f for block in blocks for f in block] + [f"{entity} is a {chain[0]}."]
        if p.shuffle_facts:
            rng.shuffle(facts)
        ask_positive = rng.random() < 0.5
        claim = f"{entity} is {'' if ask_positive else 'not '}{prop}"
        steps = tuple(f"{entity} is a {c}." for c in chain) + (
            f"{entity} is {'' if has_prop else 'not '}{prop}.",)
        question = " ".join(facts) + f" true or false: {claim}?"
        return Example(question, steps, "true" if ask_positive == has_prop else "false")


def _pronto_polarities(question: str) -> list[bool]:
    facts = question.split(" true or false: ")[0]
    return [" is not " not in f for f in facts.split(".")
            if f.strip() and " is a " not in f]


def _pronto_claimpositive_knobs(question: str) -> bool:
    return " is not " not in question.split(" true or false: ")[1]


def _pronto_answer(property_holds: bool, question: str) -> str:
    return "true" if property_holds == _pronto_claimpositive_knobs(question) else "false"


PRONTOQA_SHORTCUTS: dict[str, Callable[[str], str]] = {
    "always_true": lambda q: "true",
    "first_property_fact": lambda q: _pronto_answer(_pronto_polarities(q)[0], q),
    "last_property_fact": lambda q: _pronto_answer(_pronto_polarities(q)[-1], q),
    "majority_polarity": lambda q: _pronto_answer(
        2 * sum(_pronto_polarities(q)) > len(_pronto_polarities(q)), q),
}
