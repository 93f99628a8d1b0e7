"""Synthetic reasoning tasks: deterministic generators (index → example) with difficulty knobs.

Every task produces `Example(question, steps, answer)`: ``steps`` is the reasoning chain in
language, so the same example renders as No-CoT ("question → answer"), CoT ("question → steps →
answer") or continuous thought (the first k steps replaced by latents), see `rdlm.data.render`.

Held-out splits cannot overlap training: a problem's split is a hash of its question text
(`split_of`), fixed for all seeds and knobs, and a split's generator rejects every problem whose hash
falls elsewhere. The same question can therefore never appear in two splits.

Tasks (``difficulty`` 1 = learnable by a small CPU model … 5 = the papers' setting):
- ``chains``:   multi-hop variable chains ``a=7;d=3;b=a;e=d;?b`` → ``7``, with distractor chains;
- ``addition``: multi-digit addition ``123+45`` → ``168`` (optionally reversed digits);
- ``prosqa``:   ProsQA-style DAG reachability "is tom a A or B?" (SPEC §2);
- ``prontoqa``: ProntoQA-style k-hop logic over fictional ontologies, true/false.
`Gsm8kAug` loads user-supplied GSM8k-Aug files into the same `Example` form.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import random
import re
import string
import typing
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import yaml

from rdlm.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem: what is asked, the reasoning chain in language, and the exact answer."""

    question: str
    steps: tuple[str, ...]
    answer: str


# ---------------------------------------------------------------------------------------------
# Splits by hash of the question: disjoint by construction, independent of seeds and knobs.

SPLITS = ("train", "validation", "test")
_SPLIT_RANGES = {"train": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}
_MAX_ATTEMPTS = 1000


def _unit_hash(text: str) -> float:
    """A uniform number in [0, 1) that depends only on ``text`` (stable across processes)."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def split_of(question: str) -> str:
    """The split a question belongs to: train 80%, validation 10%, test 10% of the problem space."""
    u = _unit_hash(question)
    for split, (lo, hi) in _SPLIT_RANGES.items():
        if lo <= u < hi:
            return split
    raise AssertionError(u)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is invalid: must be one of {SPLITS}.")


def _rng(*parts: Any) -> random.Random:
    """A generator seeded by a stable hash of ``parts`` (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _require_param(ok: bool, field: str, value: Any, valid: str) -> None:
    if not ok:
        raise ConfigError(f"task knob {field}={value!r} is invalid: {valid}.")


def _positive(params: Any, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        _require_param(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                       name, value, "must be a positive integer")


class Task(Protocol):
    """A problem generator: draws one random `Example` from ``rng``."""

    name: str
    params: Any

    def generate(self, rng: random.Random) -> Example: ...


def example_at(task: Task, split: str, index: int, seed: int = 0) -> Example:
    """The ``index``-th example of ``split``: a pure function of (task, params, split, seed, index)."""
    for attempt in range(_MAX_ATTEMPTS):
        example = task.generate(_rng(task.name, task.params, split, seed, index, attempt))
        if split_of(example.question) == split:
            return example
    raise ValueError(f"task {task.name!r} with {task.params} found no {split!r} problem in "
                     f"{_MAX_ATTEMPTS} draws: its problem space is too small; raise the difficulty.")


# ---------------------------------------------------------------------------------------------
# (a) Multi-hop variable chains.

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
        _positive(self, "num_chains", "min_hops", "max_hops")
        _require_param(2 <= self.num_chains <= 10, "num_chains", self.num_chains,
                       "must be in [2, 10] (each chain ends in a different digit)")
        _require_param(self.min_hops <= self.max_hops, "min_hops", self.min_hops,
                       f"must be <= max_hops={self.max_hops}")
        _require_param(self.num_chains * (self.max_hops + 1) <= 26, "max_hops", self.max_hops,
                       f"num_chains * (max_hops + 1) must be <= 26 variables (a-z)")
        _require_param(self.order in CHAIN_ORDERS, "order", self.order,
                       f"must be one of {CHAIN_ORDERS}")
        _require_param(self.query in ("end", "any"), "query", self.query, "must be 'end' or 'any'")
        _require_param(self.notation in CHAIN_NOTATIONS, "notation", self.notation,
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


# ---------------------------------------------------------------------------------------------
# (b) Multi-digit addition.


@dataclasses.dataclass(frozen=True)
class AdditionParams:
    """Operands with [min_digits, max_digits] digits; ``reverse`` writes the answer least
    significant digit first (the order the carries are computed in: easier to learn)."""

    min_digits: int = 1
    max_digits: int = 3
    reverse: bool = False

    def __post_init__(self) -> None:
        _positive(self, "min_digits", "max_digits")
        _require_param(self.min_digits <= self.max_digits, "min_digits", self.min_digits,
                       f"must be <= max_digits={self.max_digits}")
        _require_param(self.max_digits <= 30, "max_digits", self.max_digits, "must be <= 30")


@dataclasses.dataclass(frozen=True)
class AdditionTask:
    params: AdditionParams = AdditionParams()
    name: str = "addition"

    def generate(self, rng: random.Random) -> Example:
        p = self.params
        a, b = (_random_number(rng, rng.randint(p.min_digits, p.max_digits)) for _ in range(2))
        steps, carry = [], 0
        da, db = str(a)[::-1], str(b)[::-1]
        for i in range(max(len(da), len(db))):
            x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
            total = x + y + carry
            steps.append(f"{x}+{y}+{carry}={total}")
            carry = total // 10
        answer = str(a + b)
        return Example(f"{a}+{b}", tuple(steps), answer[::-1] if p.reverse else answer)


def _random_number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)


# ---------------------------------------------------------------------------------------------
# Fictional vocabulary shared by the two logic tasks: short pronounceable made-up words.

_ONSETS = "b d f g k l m n p r s t v w z".split()
_VOWELS = "a e i o u".split()
_CODAS = "b d g k l m n p r s t x".split()
ENTITIES = ("alex", "ann", "bob", "eva", "kim", "leo", "max", "mia", "rex", "sam", "tom", "zoe")
PROPERTIES = ("red", "blue", "hot", "cold", "sour", "sweet", "shy", "loud", "dull", "bright",
              "small", "large", "wet", "dry", "fast", "slow")
# Three-letter concept names keep sequences short for character-level models; words of the
# question's own grammar, entities and properties are excluded so that parsing stays unambiguous.
_RESERVED = set(ENTITIES) | set(PROPERTIES) | {"not", "is", "a", "or", "every", "true", "false"}
CONCEPTS = sorted({o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS} - _RESERVED)


# ---------------------------------------------------------------------------------------------
# (c) ProsQA-style graph reachability (SPEC §2).


# How a ProsQA-style problem is written. ``words``: "every bex is a tor." facts, "is tom a bex or
# tor?", steps "tom is a bex." (the paper's language, a node is a three-letter word, i.e. three
# tokens of the character tokenizer). ``symbols``: every node is one letter, a fact is "b>t", the
# question "t?b|x" (is t a b or an x?), the steps the path's facts "t>b", "b>x" — the same
# graphs in a fifth of the tokens, one token per node, and every step a lookup of the node just
# written ("which facts start at b?") that the token shift hands to the next step's target
# position: the form small models learn within CPU budgets (docs/data.md).
PROSQA_NOTATIONS = ("words", "symbols")
SYMBOL_NODES = string.ascii_lowercase


@dataclasses.dataclass(frozen=True)
class ProsQAParams:
    """A DAG of ``num_nodes`` nodes (node 0 is the entity) and ``num_edges`` edges from lower to
    higher index, every edge stated as a fact; the question's reachable option is at shortest
    distance [min_hops, max_hops] from the entity, the other option is unreachable.
    ``notation`` is ``words`` or ``symbols`` (see `PROSQA_NOTATIONS`)."""

    num_nodes: int = 23
    num_edges: int = 36
    min_hops: int = 3
    max_hops: int = 6
    shuffle_facts: bool = True
    notation: str = "words"

    def __post_init__(self) -> None:
        _positive(self, "num_nodes", "num_edges", "min_hops", "max_hops")
        _require_param(self.notation in PROSQA_NOTATIONS, "notation", self.notation,
                       f"must be one of {PROSQA_NOTATIONS}")
        most = 60 if self.notation == "words" else len(SYMBOL_NODES)
        _require_param(4 <= self.num_nodes <= most, "num_nodes", self.num_nodes,
                       f"must be in [4, {most}] with notation={self.notation}")
        _require_param(self.min_hops <= self.max_hops < self.num_nodes - 1, "max_hops",
                       self.max_hops, f"must be in [min_hops={self.min_hops}, num_nodes - 2]")
        _require_param(self.num_nodes - 1 <= self.num_edges <= self.num_nodes * 3, "num_edges",
                       self.num_edges, f"must be in [num_nodes - 1, 3 * num_nodes]")


@dataclasses.dataclass(frozen=True)
class ProsQATask:
    params: ProsQAParams = ProsQAParams()
    name: str = "prosqa"

    def generate(self, rng: random.Random) -> Example:
        p = self.params
        for _ in range(_MAX_ATTEMPTS):
            # Two components grown by the same process: the entity's, holding A, and a decoy
            # rooted at a concept, holding B at the same depth. B is unreachable, yet looks like
            # A (depth, in/out-degree, mentions), so only a search from the entity tells them apart.
            # Odd node and edge counts go to either side at random, so that no size difference
            # systematically marks one component.
            others = rng.sample(range(1, p.num_nodes), p.num_nodes - 1)
            cut = (p.num_nodes + rng.randint(0, 1)) // 2
            real, decoy = [0] + sorted(others[cut:]), sorted(others[:cut])
            real_edges = int(p.num_edges * len(real) / p.num_nodes + rng.random())
            edges = (_local_dag(rng, real, real_edges, p.max_hops)
                     + _local_dag(rng, decoy, p.num_edges - real_edges, p.max_hops))
            dist, parent = _bfs(edges, 0)
            decoy_dist, _ = _bfs(edges, decoy[0])
            depths = sorted({d for d in dist.values() if p.min_hops <= d <= p.max_hops}
                            & set(decoy_dist.values()))
            if depths:
                break
        else:
            raise ValueError(f"prosqa: no valid graph for {p}; lower min_hops or raise num_nodes.")
        depth = rng.choice(depths)
        target = rng.choice(sorted(n for n, d in dist.items() if d == depth))
        other = rng.choice(sorted(n for n, d in decoy_dist.items() if d == depth))
        words = p.notation == "words"
        names = ([rng.choice(ENTITIES)] + rng.sample(CONCEPTS, p.num_nodes - 1) if words
                 else rng.sample(SYMBOL_NODES, p.num_nodes))
        facts = [_isa(names, i, j, p.notation) for i, j in edges]
        if p.shuffle_facts:
            rng.shuffle(facts)
        options = [names[target], names[other]]
        rng.shuffle(options)
        path = [target]
        while path[-1] != 0:
            path.append(parent[path[-1]])
        path.reverse()  # entity … target
        if words:  # "tom is a bex.", "tom is a tor.": what the entity is, one hop further each
            steps = tuple(_isa(names, 0, n, p.notation) for n in path[1:])
            question = " ".join(facts) + f" is {names[0]} a {options[0]} or {options[1]}?"
        else:  # the path's own facts "t>b", "b>x": each step starts where the last one ended
            steps = tuple(_isa(names, i, j, p.notation) for i, j in zip(path, path[1:]))
            question = ";".join(facts) + f";{names[0]}?{options[0]}|{options[1]}"
        return Example(question, steps, names[target])


def _isa(names: list[str], i: int, j: int, notation: str) -> str:
    """The fact "node i is a node j" (node 0 is the entity, every other node a concept)."""
    if notation == "symbols":
        return f"{names[i]}>{names[j]}"
    return f"{names[0]} is a {names[j]}." if i == 0 else f"every {names[i]} is a {names[j]}."


def _local_dag(rng: random.Random, nodes: list[int], num_edges: int, max_hops: int
               ) -> list[tuple[int, int]]:
    """``num_edges`` edges over ``nodes`` (sorted), each from a lower to a higher index. The root
    (``nodes[0]``) gets one or two children; the other edges join nearby nodes, so that shortest
    paths from the root are long (up to ~max_hops) and reachability must be searched."""
    m = len(nodes)
    if m < 2:
        return []
    root_children = rng.sample(range(1, min(m, 4)), min(rng.randint(1, 2), min(m, 4) - 1))
    edges = {(0, j) for j in root_children}
    window = max(2, (m - 1) // max_hops)
    while True:  # widen the window until enough local pairs exist
        pairs = [(i, j) for i in range(1, m) for j in range(i + 1, min(m, i + window + 1))]
        if len(pairs) >= num_edges - len(edges) or window >= m:
            break
        window += 1
    rng.shuffle(pairs)
    edges.update(pairs[:max(0, num_edges - len(edges))])
    spare = [(0, j) for j in range(1, m) if (0, j) not in edges]  # small graphs: more root edges
    edges.update(spare[:max(0, num_edges - len(edges))])
    return sorted((nodes[i], nodes[j]) for i, j in edges)


def _bfs(edges: Sequence[tuple[Any, Any]], start: Any) -> tuple[dict[Any, int], dict[Any, Any]]:
    """Shortest distances and BFS parents from ``start``."""
    children = collections.defaultdict(list)
    for i, j in edges:
        children[i].append(j)
    dist, parent, frontier = {start: 0}, {}, [start]
    while frontier:
        nxt = []
        for i in frontier:
            for j in sorted(children[i]):
                if j not in dist:
                    dist[j], parent[j] = dist[i] + 1, i
                    nxt.append(j)
        frontier = nxt
    return dist, parent


class ProsQAGraph(typing.NamedTuple):
    entity: str
    options: list[str]
    edges: list[tuple[str, str]]  # (a, b): "every a is a b" (or "entity is a b")


def parse_prosqa(question: str) -> ProsQAGraph:
    """The entity, the two options and the stated edges of a question in either notation."""
    if " is " in question:  # words: "every a is a b. … is tom a x or y?"
        facts, query = question.rsplit(" is ", 1)
        entity, options = query.split(" a ", 1)
        edges = [re.fullmatch(r"(?:every )?(\w+) is a (\w+)", f.strip()).groups()
                 for f in facts.split(".") if f.strip()]
        return ProsQAGraph(entity, options.rstrip("?").split(" or "), edges)
    *facts, query = question.split(";")  # symbols: "a>b;…;t?x|y"
    entity, options = query.split("?")
    return ProsQAGraph(entity, options.split("|"), [tuple(f.split(">")) for f in facts])


def prosqa_options(question: str) -> list[str]:
    """The two options of "… is X a A or B?" (``X?A|B`` in symbols)."""
    return parse_prosqa(question).options


def prosqa_distances(question: str) -> dict[str, int]:
    """Shortest distance (in facts) from the entity to every node it reaches, the entity at 0."""
    graph = parse_prosqa(question)
    return _bfs(graph.edges, graph.entity)[0]


def solve_prosqa(question: str) -> str:
    """Independent solver: parse the facts and search the graph from the entity."""
    dist = prosqa_distances(question)
    reachable = [o for o in prosqa_options(question) if o in dist]
    if len(reachable) != 1:
        raise ValueError(f"{len(reachable)} reachable options in {question!r}")
    return reachable[0]


def _prefer(score: Callable[[str, str], float]) -> Callable[[str], str]:
    """A heuristic answering the option with the higher ``score(question, option)`` (the first
    on a tie)."""
    def pick(question: str) -> str:
        first, second = parse_prosqa(question).options
        return second if score(question, second) > score(question, first) else first
    return pick


PROSQA_SHORTCUTS: dict[str, Callable[[str], str]] = {
    "first_option": lambda q: parse_prosqa(q).options[0],
    "more_incoming_edges": _prefer(lambda q, o: sum(b == o for _, b in parse_prosqa(q).edges)),
    "fewer_outgoing_edges": _prefer(lambda q, o: -sum(a == o for a, _ in parse_prosqa(q).edges)),
    "mentioned_later": _prefer(lambda q, o: max(
        (i for i, (_, b) in enumerate(parse_prosqa(q).edges) if b == o), default=-1)),
}


# ---------------------------------------------------------------------------------------------
# (d) ProntoQA-style k-hop logic.


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
        _positive(self, "min_hops", "max_hops")
        _require_param(self.min_hops <= self.max_hops <= 12, "max_hops", self.max_hops,
                       f"must be in [min_hops={self.min_hops}, 12]")
        _require_param(isinstance(self.distractors, int) and 1 <= self.distractors <= 3,
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


def _pronto_claim_positive(question: str) -> bool:
    return " is not " not in question.split(" true or false: ")[1]


def _pronto_answer(property_holds: bool, question: str) -> str:
    return "true" if property_holds == _pronto_claim_positive(question) else "false"


PRONTOQA_SHORTCUTS: dict[str, Callable[[str], str]] = {
    "always_true": lambda q: "true",
    "first_property_fact": lambda q: _pronto_answer(_pronto_polarities(q)[0], q),
    "last_property_fact": lambda q: _pronto_answer(_pronto_polarities(q)[-1], q),
    "majority_polarity": lambda q: _pronto_answer(
        2 * sum(_pronto_polarities(q)) > len(_pronto_polarities(q)), q),
}


# ---------------------------------------------------------------------------------------------
# (e) GSM8k-Aug files supplied by the user.


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


# ---------------------------------------------------------------------------------------------
# Registry, difficulty levels and "name=value" overrides.

TASKS: dict[str, tuple[type, type]] = {
    "chains": (ChainsTask, ChainsParams),
    "addition": (AdditionTask, AdditionParams),
    "prosqa": (ProsQATask, ProsQAParams),
    "prontoqa": (ProntoQATask, ProntoQAParams),
}

# Level 1 is meant to be learnable in minutes on a CPU; the last level is the papers' setting.
DIFFICULTY: dict[str, dict[int, dict[str, Any]]] = {
    "chains": {
        # order="chain" (a task_args override) is easier still, but a positional shortcut
        # ("nearest digit before the query's definition") solves it: no level uses it.
        1: dict(num_chains=2, min_hops=1, max_hops=2, order="interleaved", query="any"),
        2: dict(num_chains=2, min_hops=2, max_hops=3, order="interleaved", query="any"),
        3: dict(num_chains=3, min_hops=2, max_hops=4, order="interleaved"),
        4: dict(num_chains=3, min_hops=2, max_hops=4, order="shuffled"),
        5: dict(num_chains=4, min_hops=3, max_hops=5, order="shuffled"),
    },
    "addition": {
        1: dict(min_digits=1, max_digits=2, reverse=True),
        2: dict(min_digits=1, max_digits=3, reverse=True),
        3: dict(min_digits=2, max_digits=4, reverse=False),
        4: dict(min_digits=3, max_digits=6, reverse=False),
        5: dict(min_digits=5, max_digits=10, reverse=False),
    },
    "prosqa": {
        1: dict(num_nodes=8, num_edges=9, min_hops=2, max_hops=3),
        2: dict(num_nodes=12, num_edges=16, min_hops=2, max_hops=4),
        3: dict(num_nodes=16, num_edges=24, min_hops=3, max_hops=5),
        4: dict(num_nodes=20, num_edges=30, min_hops=3, max_hops=6),
        5: dict(num_nodes=23, num_edges=36, min_hops=3, max_hops=6),
    },
    "prontoqa": {
        1: dict(min_hops=1, max_hops=2, distractors=1, shuffle_facts=False),
        2: dict(min_hops=2, max_hops=3, distractors=1, shuffle_facts=True),
        3: dict(min_hops=3, max_hops=4, distractors=1, shuffle_facts=True),
        4: dict(min_hops=4, max_hops=5, distractors=2, shuffle_facts=True),
        5: dict(min_hops=5, max_hops=5, distractors=2, shuffle_facts=True),
    },
}


def make_task(name: str, difficulty: int = 1, task_args: Sequence[str] = ()) -> Task:
    """The task ``name`` at a difficulty level, with ``"knob=value"`` overrides applied."""
    if name not in TASKS:
        raise ConfigError(f"data.task={name!r} is invalid: must be one of {sorted(TASKS)}.")
    levels = DIFFICULTY[name]
    if difficulty not in levels:
        raise ConfigError(f"data.difficulty={difficulty!r} is invalid: task {name!r} has levels "
                          f"{sorted(levels)}.")
    task_cls, params_cls = TASKS[name]
    values = dict(levels[difficulty])
    hints = typing.get_type_hints(params_cls)
    for item in task_args:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or key not in hints:
            raise ConfigError(f"data.task_args entry {item!r} is invalid: want knob=value with a "
                              f"knob of task {name!r} among {sorted(hints)}.")
        value = yaml.safe_load(raw)
        expected = hints[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"data.task_args {key}={raw!r} is invalid: expected "
                              f"{expected.__name__}.")
        values[key] = value
    return task_cls(params_cls(**values))
