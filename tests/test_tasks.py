"""Synthetic reasoning tasks: determinism, disjoint splits, correct answers, shortcuts, rendering."""

import collections
import re
import subprocess
import sys

import numpy as np
import pytest

from rdlm.config import ConfigError, DataConfig
from rdlm.data import tasks
from rdlm.data.render import parse_answer, prompt_tokens, render
from rdlm.data.tasks import Example, example_at, make_task, shortcut_accuracy, split_of
from rdlm.data.tokenizer import CharTokenizer, load_tokenizer

TASK_NAMES = sorted(tasks.TASKS)
TOK = CharTokenizer()


def _examples(task, split, n, start=0):
    return [example_at(task, split, i) for i in range(start, start + n)]


def test_config_task_names_match_registry():
    from rdlm.config import TASK_NAMES as CONFIG_TASK_NAMES
    assert sorted(CONFIG_TASK_NAMES) == TASK_NAMES  # the config's literal list is the registry's
    for name in TASK_NAMES:
        DataConfig(task=name)


@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("level", [1, 5])
def test_same_index_same_example(name, level):
    task = make_task(name, level)
    first = _examples(task, "train", 20)
    assert first == _examples(make_task(name, level), "train", 20)
    assert len({e.question for e in first}) > 15  # different indices give different problems


def test_examples_do_not_depend_on_the_process_hash_seed():
    code = ("from rdlm.data.tasks import make_task, example_at;"
            "print(example_at(make_task('prosqa', 2), 'test', 7))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu"}).stdout
            for seed in ("1", "2")}
    assert len(outs) == 1 and str(example_at(make_task("prosqa", 2), "test", 7)) in outs.pop()


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_are_disjoint(name):
    task = make_task(name, 1)
    train = _examples(task, "train", 400)
    test = _examples(task, "test", 200)
    validation = _examples(task, "validation", 100)
    assert all(split_of(e.question) == "train" for e in train)
    assert all(split_of(e.question) == "test" for e in test)
    questions = [{e.question for e in s} for s in (train, test, validation)]
    assert not questions[0] & questions[1]
    assert not questions[0] & questions[2]
    assert not questions[1] & questions[2]


def test_split_partition_is_about_80_10_10():
    task = make_task("chains", 3)
    rng_questions = [task.generate(tasks.seeded_rng("probe", i)).question for i in range(3000)]
    fractions = {s: np.mean([split_of(q) == s for q in rng_questions]) for s in tasks.SPLITS}
    assert abs(fractions["train"] - 0.8) < 0.03 and abs(fractions["test"] - 0.1) < 0.02


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_chain_answers_follow_the_chain(level):
    task = make_task("chains", level)
    for e in _examples(task, "train", 100):
        assert tasks.solve_chains(e.question) == e.answer
        digits = [c for c in e.question if c.isdigit()]
        assert len(digits) == len(set(digits)) == task.params.num_chains  # every chain ends apart
        hops = len(e.steps) - 1
        low = 0 if task.params.query == "any" else task.params.min_hops
        assert low <= hops <= task.params.max_hops
        assert e.steps[-1].startswith(e.question.rsplit("?", 1)[1] + "=")


@pytest.mark.parametrize("notation", ["assign", "flow"])
def test_interleaved_statements_only_refer_backwards(notation):
    task = make_task("chains", 3, [f"notation={notation}"])
    for e in _examples(task, "train", 50):
        defined = set()
        for statement in e.question.rsplit(";?", 1)[0].split(";"):
            var, value = tasks.parse_statement(statement)
            assert value.isdigit() or value in defined
            defined.add(var)


def test_flow_notation_is_the_same_problem_written_the_other_way():
    assign, flow = make_task("chains", 2), make_task("chains", 2, ["notation=flow"])
    for i in range(30):
        # The same random draws give the same chains: each "b=a" is written "a>b".
        a, f = assign.generate(tasks.seeded_rng("same", i)), flow.generate(tasks.seeded_rng("same", i))
        body_a, query_a = a.question.rsplit(";?", 1)
        body_f, query_f = f.question.rsplit(";?", 1)
        assert query_a == query_f and a.answer == f.answer == tasks.solve_chains(f.question)
        for sa, sf in zip(body_a.split(";"), body_f.split(";")):
            target, source = sa.split("=")
            assert sf == f"{source}>{target}"
        assert [q for q, _ in tasks.chains_questions(f)] == [
            q.replace(body_a, body_f) for q, _ in tasks.chains_questions(a)]
    assert tasks.parse_statement("7>k") == tasks.parse_statement("k=7") == ("k", "7")
    with pytest.raises(ConfigError, match="notation"):
        make_task("chains", 1, ["notation=arrows"])


def test_shortcuts_are_near_chance_on_the_hard_setting():
    task = make_task("chains", 5)
    acc = shortcut_accuracy(_examples(task, "test", 600))
    chance = 1 / task.params.num_chains
    assert all(abs(a - chance) < 0.07 for a in acc.values()), acc


def test_shortcuts_detect_the_easy_positional_shortcut():
    chain_order = make_task("chains", 1, ["order=chain"])
    acc = shortcut_accuracy(_examples(chain_order, "test", 200))
    assert acc["nearest_digit_before_query"] == 1.0  # why no level lists chains contiguously
    acc = shortcut_accuracy(_examples(make_task("chains", 1), "test", 400))
    assert max(acc["first_digit"], acc["last_digit"], acc["most_frequent_digit"]) < 0.6


@pytest.mark.parametrize("level", [1, 3, 5])
def test_addition_answers(level):
    task = make_task("addition", level)
    for e in _examples(task, "train", 100):
        a, b = map(int, e.question.split("+"))
        answer = str(a + b)
        assert e.answer == (answer[::-1] if task.params.reverse else answer)
        assert len(e.steps) == max(len(str(a)), len(str(b)))


@pytest.mark.parametrize("level,notation", [(1, "words"), (3, "words"), (5, "words"),
                                            (1, "symbols"), (5, "symbols"), (5, "paper")])
def test_prosqa_structure_and_answers(level, notation):
    task = make_task("prosqa", level, [f"notation={notation}"])
    p = task.params
    for e in _examples(task, "train", 40):
        graph = tasks.parse_prosqa(e.question)
        assert len(graph.edges) == p.num_edges  # every edge is stated as a fact
        names = {n for edge in graph.edges for n in edge}
        assert graph.entity in names and len(names) <= p.num_nodes
        assert tasks.solve_prosqa(e.question) == e.answer  # exactly one option is reachable
        assert p.min_hops <= len(e.steps) <= p.max_hops
        # The steps walk a shortest path: the i-th names a node at distance i from the entity.
        dist = tasks.prosqa_distances(e.question)
        walked = [step.rstrip(".").rsplit(" ", 1)[1] if notation != "symbols" else step[-1]
                  for step in e.steps]
        assert [dist[n] for n in walked] == list(range(1, len(e.steps) + 1))
        assert walked[-1] == (e.answer.rstrip(".").rsplit(" ", 1)[1] if notation == "paper"
                              else e.answer)
        if notation == "symbols":  # the steps are stated facts, each from the previous node
            steps = tasks.parse_prosqa(";".join(e.steps) + f";{graph.entity}?x|y").edges
            assert set(steps) <= set(graph.edges)
            assert [a for a, _ in steps] == [graph.entity, *walked[:-1]]
        assert walked[-1] in graph.options and len(set(graph.options)) == 2
        if notation == "symbols":  # one character per node, facts joined by ";"
            assert all(len(n) == 1 for n in names | set(graph.options))
            assert e.question.count(";") == p.num_edges


def test_prosqa_notations_write_the_same_graph():
    """The notation changes only how a problem is written: the same draw gives the same graph."""
    import random

    def shape(e):
        graph = tasks.parse_prosqa(e.question)
        degree = collections.Counter(a for a, _ in graph.edges)
        return len(e.steps), sorted(degree.values()), sorted(tasks.prosqa_distances(
            e.question).values())

    words_task, symbols_task = make_task("prosqa", 2), make_task("prosqa", 2, ["notation=symbols"])
    for seed in range(20):
        words, symbols = (t.generate(random.Random(seed)) for t in (words_task, symbols_task))
        assert shape(words) == shape(symbols)
        assert len(symbols.question) < len(words.question) / 3
    with pytest.raises(ConfigError, match="num_nodes"):
        make_task("prosqa", 1, ["notation=symbols", "num_nodes=27", "num_edges=30"])
    with pytest.raises(ConfigError, match="notation"):
        make_task("prosqa", 1, ["notation=emoji"])


def test_prosqa_paper_notation_is_the_papers_surface_form():
    import random
    words, paper = make_task("prosqa", 2), make_task("prosqa", 2, ["notation=paper"])
    e, w = paper.generate(random.Random(3)), words.generate(random.Random(3))
    assert re.fullmatch(r"(Every [a-z]+pus is a [a-z]+pus\. |[A-Z][a-z]+ is a [a-z]+pus\. )+"
                        r"Is [A-Z][a-z]+ a [a-z]+pus or [a-z]+pus\?", e.question), e.question
    entity = tasks.parse_prosqa(e.question).entity
    assert all(re.fullmatch(rf"{entity} is a [a-z]+pus\.", s) for s in e.steps)
    assert e.answer == e.steps[-1] and tasks.solve_prosqa(e.question) == e.answer
    assert len(e.steps) == len(w.steps)  # the same graph as the words notation draws
    # A question as the paper's files write it, with "or a": parsed and solved the same way.
    given = ("Every wumpus is a yumpus. Every yumpus is a hilpus. Every zumpus is a sterpus. "
             "Sally is a wumpus. Is Sally a sterpus or a hilpus?")
    assert tasks.solve_prosqa(given) == "Sally is a hilpus."
    assert {name: f(given) for name, f in tasks.PROSQA_SHORTCUTS.items()}["first_option"] == (
        "Sally is a sterpus.")


def test_prosqa_full_setting_matches_the_paper():
    task = make_task("prosqa", 5)
    assert (task.params.num_nodes, task.params.num_edges) == (23, 36)
    hops = [len(e.steps) for e in _examples(task, "train", 60)]
    assert min(hops) >= 3 and max(hops) <= 6 and len(set(hops)) >= 2


def _solve_prontoqa(question: str) -> str:
    facts, claim = question.split(" true or false: ")
    isa, props = {}, {}
    for fact in (f.strip() for f in facts.split(".") if f.strip()):
        words = fact.split()
        if words[0] == "every" and words[3] == "a":
            isa[words[1]] = words[4]
        elif words[0] == "every":
            props[words[1]] = (words[3] != "not", words[-1])
        else:
            isa[words[0]] = words[3]
    words = claim.rstrip("?").split()
    entity, positive = words[0], words[2] != "not"
    node = entity
    while node in isa:
        node = isa[node]
        if node in props:
            return "true" if props[node][0] == positive else "false"
    raise ValueError(question)


@pytest.mark.parametrize("level", [1, 5])
def test_prontoqa_answers(level):
    task = make_task("prontoqa", level)
    examples = _examples(task, "train", 100)
    assert all(_solve_prontoqa(e.question) == e.answer for e in examples)
    assert 0.3 < np.mean([e.answer == "true" for e in examples]) < 0.7
    assert all(task.params.min_hops + 2 <= len(e.steps) <= task.params.max_hops + 2
               for e in examples)


def test_gsm8k_aug_formats(tmp_path):
    line = "Tom has 3 apples and buys 4 more.||<<3+4=7>> <<7*2=14>> #### 14"
    e = tasks.parse_gsm8k_aug_line(line)
    assert e == Example("Tom has 3 apples and buys 4 more.", ("3+4=7", "7*2=14"), "14")
    (tmp_path / "a.txt").write_text(line + "\n\n" + line + "\n")
    assert tasks.load_gsm8k_aug(tmp_path / "a.txt") == [e, e]
    (tmp_path / "a.jsonl").write_text(
        '{"question": "Tom has 3 apples and buys 4 more.", "steps": ["<<3+4=7>>", "<<7*2=14>>"],'
        ' "answer": "14"}\n')
    assert tasks.load_gsm8k_aug(tmp_path / "a.jsonl") == [e]
    with pytest.raises(ValueError, match="GSM8k-Aug"):
        tasks.parse_gsm8k_aug_line("no separators here")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_fits_the_character_vocabulary(name):
    assert TOK.vocab_size <= 64  # the "tiny" model preset
    for e in _examples(make_task(name, 5), "train", 10):
        for fmt in ("nocot", "cot", "coconut"):
            tokens, mask = render(e, TOK, fmt=fmt, num_latent_steps=2)
            assert tokens.max() < TOK.vocab_size and len(tokens) == len(mask)


def test_render_nocot_and_cot_masks():
    e = Example("a=7;b=3;c=a;?c", ("a=7", "c=7"), "7")
    tokens, mask = render(e, TOK, fmt="nocot")
    assert TOK.decode(tokens) == "<bos>a=7;b=3;c=a;?c\n#7<eos>"
    assert TOK.decode(tokens[mask == 1]) == "#7<eos>"
    tokens, mask = render(e, TOK, fmt="cot")
    assert TOK.decode(tokens[mask == 1]) == "a=7\nc=7\n#7<eos>"
    assert TOK.decode(prompt_tokens(e, TOK)) == "<bos>a=7;b=3;c=a;?c\n"
    _, mask_all = render(e, TOK, fmt="cot", loss_on="all")
    assert mask_all[0] == 0 and mask_all[1:].all()


def test_render_coconut_replaces_steps_by_latents():
    e = Example("q?", ("s1", "s2", "s3"), "42")
    tokens, mask = render(e, TOK, fmt="coconut", num_latent_steps=2, latents_per_step=2)
    assert TOK.decode(tokens) == "<bos>q?\n<bot><latent><latent><latent><latent><eot>s3\n#42<eos>"
    assert TOK.decode(tokens[mask == 1]) == "s3\n#42<eos>"  # loss only on remaining steps+answer
    tokens, mask = render(e, TOK, fmt="coconut", num_latent_steps=9)
    assert TOK.decode(tokens[mask == 1]) == "#42<eos>"
    assert (tokens == TOK.latent_id).sum() == 9


def test_parse_answer():
    assert parse_answer("a=7\nc=7\n#7") == "7"
    assert parse_answer("#tru\n#true\nmore") == "true"
    assert parse_answer("no mark") == ""


def test_char_tokenizer_round_trip_and_errors():
    text = "every bex is a tor. is tom a bex or tor?"
    assert TOK.decode(TOK.encode(text)) == text
    with pytest.raises(ValueError, match="cannot encode"):
        TOK.encode("Upper")
    ascii_tok = load_tokenizer("ascii")
    assert ascii_tok.decode(ascii_tok.encode("Tom's $3.")) == "Tom's $3."
    assert (ascii_tok.bos_id, ascii_tok.latent_id) == (TOK.bos_id, TOK.latent_id)


def test_bad_task_settings_name_the_problem():
    with pytest.raises(ConfigError, match="knob"):
        make_task("chains", 1, ["max_hopz=3"])
    with pytest.raises(ConfigError, match="expected int"):
        make_task("chains", 1, ["max_hops=many"])
    with pytest.raises(ConfigError, match="num_chains"):
        make_task("chains", 1, ["num_chains=1"])
    with pytest.raises(ConfigError, match="26 variables"):
        make_task("chains", 5, ["max_hops=9"])
    with pytest.raises(ConfigError, match="distractors"):
        make_task("prontoqa", 1, ["distractors=0"])
    with pytest.raises(ConfigError, match="data.task="):
        make_task("sudoku", 1)


def test_bad_data_config_values_name_the_field():
    for kwargs, field in [(dict(source="csv"), "data.source"), (dict(task="sudoku"), "data.task"),
                          (dict(difficulty=9), "data.difficulty"), (dict(format="x"), "data.format"),
                          (dict(packing="greedy"), "data.packing"), (dict(source="memmap"), "data.paths"),
                          (dict(loss_on="some"), "data.loss_on"),
                          (dict(num_examples=0), "data.num_examples")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            DataConfig(**kwargs)


def test_task_knobs_are_checked_before_training(capsys):
    import rdlm
    from rdlm.cli.train import cli as train_cli
    from rdlm.data.pipeline import make_dataset
    # The config checks the form of an entry; the task checks its knobs when data is built, and
    # `python -m rdlm train` does that before anything else.
    with pytest.raises(ConfigError, match=r"data\.task_args.*knob=value"):
        rdlm.load_config("configs/tiny.yaml", ["data.task_args=[max_hops]"])
    cfg = rdlm.load_config("configs/tiny.yaml", ["data.task_args=[max_hopz=3]"])
    with pytest.raises(ConfigError, match="max_hopz"):
        make_dataset(cfg)
    assert train_cli(["configs/tiny.yaml", "data.task_args=[max_hopz=3]"]) == 2
    assert "max_hopz" in capsys.readouterr().err
    cfg = rdlm.load_config("configs/tiny.yaml", ["data.task_args=[max_hops=3, order=shuffled]"])
    assert cfg.data.task_args == ("max_hops=3", "order=shuffled")


@pytest.mark.parametrize("level", [1, 5])
def test_prosqa_options_cannot_be_told_apart_without_search(level):
    # The unreachable option comes from a decoy component grown like the entity's, at the same
    # depth: degree and position heuristics stay at the 2-way guess.
    acc = shortcut_accuracy(_examples(make_task("prosqa", level), "test", 300),
                            tasks.PROSQA_SHORTCUTS)
    assert all(abs(a - 0.5) < 0.12 for a in acc.values()), acc


@pytest.mark.parametrize("level", [1, 5])
def test_prontoqa_needs_the_entity_chain(level):
    acc = shortcut_accuracy(_examples(make_task("prontoqa", level), "test", 300),
                            tasks.PRONTOQA_SHORTCUTS)
    assert all(abs(a - 0.5) < 0.12 for a in acc.values()), acc
