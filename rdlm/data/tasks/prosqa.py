"""(c) ProsQA-style graph reachability (SPEC §2): "is tom a A or B?" over a DAG of "every X is a
Y" facts, where only a search from the entity tells the reachable option from a decoy; a parser, an
independent solver and answer heuristics that do not search."""

from __future__ import annotations

import collections
import dataclasses
import random
import re
import string
import typing
from typing import Any, Callable, Sequence

from rdlm.data.tasks.base import MAX_ATTEMPTS, Example, positive_knobs, require_knob
from rdlm.data.tasks.words import CONCEPTS, ENTITIES, PAPER_CONCEPTS, PAPER_ENTITIES


# How a ProsQA-style problem is written. ``words``: "every bex is a tor." facts, "is tom a bex or
# tor?", steps "tom is a bex." (the paper's language, a node is a three-letter word, i.e. three
# tokens of the character tokenizer). ``symbols``: every node is one letter, a fact is "b>t", the
# question "t?b|x" (is t a b or an x?), the steps the path's facts "t>b", "b>x" — the same
# graphs in a fifth of the tokens, one token per node, and every step a lookup of the node just
# written ("which facts start at b?") that the token shift hands to the next step's target
# position: the form small models learn within CPU budgets (docs/data.md). ``paper``: the surface
# form of the paper's data files, "Every wumpus is a yumpus.", "Sally is a zumpus.", "Is Sally a
# hilpus or sterpus?", steps "Sally is a wumpus." and the answer "Sally is a sterpus.", so that
# a model trained on generated problems can be scored on the published test file.
PROSQA_NOTATIONS = ("words", "symbols", "paper")
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
        positive_knobs(self, "num_nodes", "num_edges", "min_hops", "max_hops")
        require_knob(self.notation in PROSQA_NOTATIONS, "notation", self.notation,
                       f"must be one of {PROSQA_NOTATIONS}")
        most = 60 if self.notation == "words" else len(SYMBOL_NODES)
        require_knob(4 <= self.num_nodes <= most, "num_nodes", self.num_nodes,
                       f"must be in [4, {most}] with notation={self.notation}")
        require_knob(self.min_hops <= self.max_hops < self.num_nodes - 1, "max_hops",
                       self.max_hops, f"must be in [min_hops={self.min_hops}, num_nodes - 2]")
        require_knob(self.num_nodes - 1 <= self.num_edges <= self.num_nodes * 3, "num_edges",
                       self.num_edges, "must be in [num_nodes - 1, 3 * num_nodes]")


@dataclasses.dataclass(frozen=True)
class ProsQATask:
    params: ProsQAParams = ProsQAParams()
    name: str = "prosqa"

    def generate(self, rng: random.Random) -> Example:
        p = self.params
        for _ in range(MAX_ATTEMPTS):
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
        words = p.notation != "symbols"
        if p.notation == "paper":
            names = [rng.choice(PAPER_ENTITIES)] + rng.sample(PAPER_CONCEPTS, p.num_nodes - 1)
        elif words:
            names = [rng.choice(ENTITIES)] + rng.sample(CONCEPTS, p.num_nodes - 1)
        else:
            names = rng.sample(SYMBOL_NODES, p.num_nodes)
        facts = [_isa(names, i, j, p.notation) for i, j in edges]
        if p.shuffle_facts:
            rng.shuffle(facts)
        options = [names[target], names[other]]
        rng.shuffle(options)
        path = [target]
        while path[-1] != 0:
            path.append(parent[path[-1]])
        path.reverse()  # entity … target
        if p.notation == "paper":
            steps = tuple(_isa(names, 0, n, p.notation) for n in path[1:])
            question = " ".join(facts) + f" Is {names[0]} a {options[0]} or {options[1]}?"
            return Example(question, steps, _isa(names, 0, target, p.notation))
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
    every = "Every" if notation == "paper" else "every"
    return f"{names[0]} is a {names[j]}." if i == 0 else f"{every} {names[i]} is a {names[j]}."


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


# The paper's question: "… Is Sally a hilpus or sterpus?" (also "… or a sterpus?").
_PAPER_QUERY = re.compile(r"(.*?)\s*\bIs (\w+) an? (\w+) or (?:an? )?(\w+)\?\s*$", re.S)


def parse_prosqa(question: str) -> ProsQAGraph:
    """The entity, the two options and the stated edges of a question in any notation."""
    paper = _PAPER_QUERY.fullmatch(question)
    if paper:  # "Every a is a b. Sally is a c. … Is Sally a x or y?"
        facts, entity, first, second = paper.groups()
        edges = [re.fullmatch(r"(?:Every |every )?(\w+) is an? (\w+)", f.strip()).groups()
                 for f in facts.split(".") if f.strip()]
        return ProsQAGraph(entity, [first, second], edges)
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
    """Independent solver: parse the facts and search the graph from the entity. The answer is
    written as the question's notation writes it: the option, or "Sally is a sterpus." for the
    paper's form."""
    dist = prosqa_distances(question)
    reachable = [o for o in prosqa_options(question) if o in dist]
    if len(reachable) != 1:
        raise ValueError(f"{len(reachable)} reachable options in {question!r}")
    return _as_answer(question, reachable[0])


def _as_answer(question: str, option: str) -> str:
    """``option`` written as an answer in the question's notation."""
    if _PAPER_QUERY.fullmatch(question):
        return f"{parse_prosqa(question).entity} is a {option}."
    return option


def _prefer(score: Callable[[str, str], float]) -> Callable[[str], str]:
    """A heuristic answering the option with the higher ``score(question, option)`` (the first
    on a tie)."""
    def pick(question: str) -> str:
        first, second = parse_prosqa(question).options
        return _as_answer(question,
                          second if score(question, second) > score(question, first) else first)
    return pick


PROSQA_SHORTCUTS: dict[str, Callable[[str], str]] = {
    "first_option": lambda q: _as_answer(q, parse_prosqa(q).options[0]),
    "more_incoming_edges": _prefer(lambda q, o: sum(b == o for _, b in parse_prosqa(q).edges)),
    "fewer_outgoing_edges": _prefer(lambda q, o: -sum(a == o for a, _ in parse_prosqa(q).edges)),
    "mentioned_later": _prefer(lambda q, o: max(
        (i for i, (_, b) in enumerate(parse_prosqa(q).edges) if b == o), default=-1)),
}
