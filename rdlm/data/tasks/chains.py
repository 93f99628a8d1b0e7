"""(a) Multi-hop variable chains ``a=7;d=3;b=a;e=d;?b`` -> ``7``, with distractor chains; an
independent solver, every question a context answers (for ``data.branches``) and answer
heuristics that do not follow the chain."""

from __future__ import annotations

import collections
import dataclasses
import random
import string
from typing import Callable, Sequence

from rdlm.data.tasks.base import Example, positive_knobs, require_knob


CHAIN_ORDERS = ("chain", "interleaved", "shuffled")
# notation -> how "target takes source's value" is written
CHAIN_NOTATIONS: dict[str, Callable[[str, str], str]] = {
    "assign": lambda target, source: f"{target}={source}",
    "flow": lambda target, source: f"{source}>{target}",
}


def parse_statement(statement: str) -> tuple[str, str]:
    """(target, source) of a chains statement in either notation."""
    if "=" in statement:
        target, source = statement.split("=")
        return target, source
    source, target = statement.split(">")
    return target, source


@dataclasses.dataclass(frozen=True)
class ChainsParams:
    """``num_chains`` chains, each rooted at a distinct digit; the query's chain has a hop count
    drawn from [min_hops, max_hops] (the others too). ``order``: ``chain`` lists each chain's
    statements together and in order (learnable, but a "nearest digit before the query" shortcut
    exists), ``interleaved`` merges the chains at random keeping each chain's order (every
    statement refers to an earlier one: hop-by-hop resolution), ``shuffled`` is a random order.
    ``query``: ``end`` asks for the last variable of a chain (its full hop count); ``any`` asks for
    a uniformly chosen variable of the chain, 0 hops (the root) included — a built-in curriculum
    whose easy queries teach the lookup that the deep ones compose.
    ``notation``: ``assign`` writes ``b=a`` (b takes a's value), ``flow`` writes the same statement
    as ``a>b`` (a's value flows into b). With ``flow`` the token where a statement ends and the
    answer position both sit two tokens after the variable whose value they need, so one
    attention head — "read the value at the statement ending in my second-previous token" — both
    answers the query and, applied again on the next recurrence step, resolves every statement
    one hop further."""

    num_chains: int = 2
    min_hops: int = 1
    max_hops: int = 2
    order: str = "interleaved"
    query: str = "end"
    notation: str = "assign"

    def __post_init__(self) -> None:
        positive_knobs(self, "num_chains", "min_hops", "max_hops")
        require_knob(2 <= self.num_chains <= 10, "num_chains", self.num_chains,
                       "must be in [2, 10] (each chain ends in a different digit)")
        require_knob(self.min_hops <= self.max_hops, "min_hops", self.min_hops,
                       f"must be <= max_hops={self.max_hops}")
        require_knob(self.num_chains * (self.max_hops + 1) <= 26, "max_hops", self.max_hops,
                       "num_chains * (max_hops + 1) must be <= 26 variables (a-z)")
        require_knob(self.order in CHAIN_ORDERS, "order", self.order,
                       f"must be one of {CHAIN_ORDERS}")
        require_knob(self.query in ("end", "any"), "query", self.query, "must be 'end' or 'any'")
        require_knob(self.notation in CHAIN_NOTATIONS, "notation", self.notation,
                       f"must be one of {sorted(CHAIN_NOTATIONS)}")


@dataclasses.dataclass(frozen=True)
class ChainsTask:
    params: ChainsParams = ChainsParams()
    name: str = "chains"

    def generate(self, rng: random.Random) -> Example:
        p = self.params
        hops = [rng.randint(p.min_hops, p.max_hops) for _ in range(p.num_chains)]
        names = rng.sample(string.ascii_lowercase, sum(h + 1 for h in hops))
        digits = rng.sample(string.digits, p.num_chains)
        chains, start = [], 0
        for h, digit in zip(hops, digits):
            variables = names[start:start + h + 1]
            start += h + 1
            write = CHAIN_NOTATIONS[p.notation]
            statements = [write(variables[0], digit)]
            statements += [write(variables[i], variables[i - 1]) for i in range(1, h + 1)]
            chains.append((variables, statements))
        statements = _order_statements([s for _, s in chains], p.order, rng)
        query = rng.randrange(p.num_chains)
        variables, _ = chains[query]
        if p.query == "any":
            variables = variables[:rng.randint(1, len(variables))]
        steps = tuple(write(v, digits[query]) for v in variables)
        question = ";".join(statements) + f";?{variables[-1]}"
        return Example(question, steps, digits[query])


def _order_statements(chains: list[list[str]], order: str, rng: random.Random) -> list[str]:
    if order == "chain":
        return [s for chain in chains for s in chain]
    if order == "shuffled":
        flat = [s for chain in chains for s in chain]
        rng.shuffle(flat)
        return flat
    # interleaved: a uniformly random merge that keeps each chain's own order.
    queues = [list(chain) for chain in chains]
    slots = [i for i, q in enumerate(queues) for _ in q]
    rng.shuffle(slots)
    return [queues[i].pop(0) for i in slots]


def solve_chains(question: str) -> str:
    """Independent solver: follow assignments from the queried variable back to a digit."""
    body, query = question.rsplit(";?", 1)
    value = dict(parse_statement(s) for s in body.split(";"))
    seen = set()
    while not query.isdigit():
        if query in seen:
            raise ValueError(f"cycle in {question!r}")
        seen.add(query)
        query = value[query]
    return query


def chains_questions(example: Example) -> list[tuple[str, str]]:
    """Every question the statements of a chains example answer: (question, answer) for each
    variable, in the order the statements define them."""
    body = example.question.rsplit(";?", 1)[0]
    questions = [f"{body};?{parse_statement(s)[0]}" for s in body.split(";")]
    return [(q, solve_chains(q)) for q in questions]


# Tasks whose examples share a context with other questions (for `data.branches`).
SIBLING_QUESTIONS: dict[str, Callable[[Example], list[tuple[str, str]]]] = {
    "chains": chains_questions,
}


def _chain_digits(question: str) -> list[str]:
    return [c for c in question.rsplit(";?", 1)[0] if c.isdigit()]


def _nearest_digit_before_query(question: str) -> str:
    """The digit closest before the query variable's definition: right whenever chains are
    listed contiguously, without following any pointer."""
    body, query = question.rsplit(";?", 1)
    statements = body.split(";")
    where = next(i for i, s in enumerate(statements) if parse_statement(s)[0] == query)
    for _, source in map(parse_statement, reversed(statements[:where + 1])):
        if source.isdigit():
            return source
    return _chain_digits(question)[0]


CHAIN_SHORTCUTS: dict[str, Callable[[str], str]] = {
    "first_digit": lambda q: _chain_digits(q)[0],
    "last_digit": lambda q: _chain_digits(q)[-1],
    "most_frequent_digit": lambda q: collections.Counter(_chain_digits(q)).most_common(1)[0][0],
    "nearest_digit_before_query": _nearest_digit_before_query,
}


def shortcut_accuracy(examples: Sequence[Example],
                      heuristics: dict[str, Callable[[str], str]] | None = None
                      ) -> dict[str, float]:
    """Accuracy of answer heuristics that do not follow the chain (default: `CHAIN_SHORTCUTS`).

    Report these next to a model's accuracy: a model is only shown to follow chains where it beats
    every heuristic. Chance is 1 / num_chains.
    """
    heuristics = CHAIN_SHORTCUTS if heuristics is None else heuristics
    n = max(len(examples), 1)
    return {name: sum(h(e.question) == e.answer for e in examples) / n
            for name, h in heuristics.items()}
