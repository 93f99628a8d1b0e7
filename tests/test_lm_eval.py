"""``--model rdlm`` in the real lm-evaluation-harness, offline: local tasks (multiple choice,
generation, rolling log-likelihood) written here, run by `lm_eval.simple_evaluate` on a small
random-init checkpoint, and every per-request result checked against rdlm's own forward and
`rdlm.generate`."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="the eval extra (pip install 'rdlm[eval]') is not installed")
# Nothing in these tests may reach the network (the tasks' data are local JSON files).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

import rdlm  # noqa: E402
from rdlm.cli.lm_eval import with_model  # noqa: E402
from rdlm.config import Config, ConfigError, model_preset  # noqa: E402
from rdlm.data.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402
from rdlm.generation.scoring import bucket_length, score_batch  # noqa: E402
from rdlm.lm_eval import RDLM, stop_token_ids  # noqa: E402
from tests.multihost import _free_port, xla_flags  # noqa: E402
from rdlm.runtime.checkpoint import load_params, save_params  # noqa: E402
from tests.test_interop_tokenizer import SPECIALS, train_bpe  # noqa: E402

R = 2  # core iterations of the evaluated model (the tiny preset's training mean is 4)
# Direct forwards run on [DIRECT_ROWS, DIRECT_LEN], rows right-padded (a causal model's earlier
# positions do not see the padding), so that one compilation serves every check.
DIRECT_ROWS, DIRECT_LEN = 8, 48

MC_DOCS = [{"question": "2+3=", "choices": ["5", "6", "7"], "answer": 0},
           {"question": "a b c d", "choices": ["e", "f g", "x"], "answer": 1},
           {"question": "is 7 odd?", "choices": ["yes", "no"], "answer": 0}]
GEN_DOCS = [{"question": "count: 1 2 3", "answer": "4"}, {"question": "abc", "answer": "d"},
            {"question": "the cat sat on", "answer": "a mat"}]
ROLL_DOCS = [{"text": "think deeper."}, {"text": "short one"}]
LONG_TEXT = "recurrent depth models think in latent space."
# Stop strings of several tokens: generation runs to max_gen_toks and the text is cut (one-token
# stop strings also end a row early: test_one_token_stop_strings_become_stop_tokens).
UNTIL = ["e.", "\n\n"]
MAX_GEN_TOKS = 10


def task_yaml(name, path, output_type, body):
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
            f"test_split: test\noutput_type: {output_type}\n{body}")


def write_tasks(folder):
    """Three tasks (multiple choice, generation, rolling log-likelihood) and their data."""
    folder.mkdir()
    specs = {
        "rdlm_mc": ("multiple_choice", MC_DOCS,
                    'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                    'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
        "rdlm_gen": ("generate_until", GEN_DOCS,
                     'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                     f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n"
                     f"  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\n"
                     "metric_list:\n  - metric: exact_match\n"),
        "rdlm_roll": ("loglikelihood_rolling", ROLL_DOCS,
                      'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                      "metric_list:\n  - metric: word_perplexity\n"),
    }
    for name, (output_type, docs, body) in specs.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(task_yaml(name, data, output_type, body))
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A random-init tiny checkpoint (character tokenizer) and its params as loaded."""
    cfg = Config(model=model_preset("tiny"))
    path = tmp_path_factory.mktemp("run") / "ckpt"
    save_params(path, cfg, rdlm.init_params(cfg.model, jax.random.key(0)))
    return path, cfg.model, load_params(path)[1]


@pytest.fixture(scope="module")
def model(tiny_run):
    return RDLM(checkpoint=str(tiny_run[0]), num_steps=R, batch_size=4)


@pytest.fixture(scope="module")
def evaluation(model, tmp_path_factory):
    folder = write_tasks(tmp_path_factory.mktemp("tasks") / "tasks")
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, tasks=["rdlm_mc", "rdlm_gen", "rdlm_roll"],
                                   task_manager=manager, log_samples=True)


def direct_scores(params, cfg, rows, num_steps):
    """(sum log p(continuation | context), greedy) per (context ids, continuation ids), from
    `rdlm.forward` on each whole row."""
    assert len(rows) <= DIRECT_ROWS
    tokens = np.zeros((DIRECT_ROWS, DIRECT_LEN), np.int32)
    for i, (context, continuation) in enumerate(rows):
        whole = context + continuation
        tokens[i, :len(whole)] = whole
    logits, _ = rdlm.forward(params, tokens, cfg, num_steps=num_steps, init_scale=0.0)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    out = []
    for i, (context, continuation) in enumerate(rows):
        positions = np.arange(len(context) - 1, len(context) + len(continuation) - 1)
        targets = np.asarray(continuation)
        out.append((float(logp[i, positions, targets].sum()),
                    bool((logp[i, positions].argmax(-1) == targets).all())))
    return out


def test_multiple_choice_equals_rdlm_forward(evaluation, tiny_run):
    _, cfg, params = tiny_run
    tok = load_tokenizer("chars")
    samples = evaluation["samples"]["rdlm_mc"]
    assert len(samples) == len(MC_DOCS)
    rows, got = [], []
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            rows.append((tok.prompt(context), tok.encode(continuation)))
            got.append(tuple(resp[0]))
    want = direct_scores(params, cfg, rows, R)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    # The task's accuracy is the argmax over choices of those same numbers.
    picks, k = [], 0
    for sample in samples:
        n = len(sample["arguments"])
        picks.append(int(np.argmax([w[0] for w in want[k:k + n]])) == sample["doc"]["answer"])
        k += n
    assert evaluation["results"]["rdlm_mc"]["acc,none"] == pytest.approx(np.mean(picks))


def test_generation_equals_rdlm_generate_cut_at_the_first_stop_string(evaluation, tiny_run):
    _, cfg, params = tiny_run
    tok = load_tokenizer("chars")
    samples = evaluation["samples"]["rdlm_gen"]
    contexts = [s["arguments"][0][0] for s in samples]
    prompts = [tok.prompt(c) for c in contexts]
    # Padded to the model's batch size and bucketed prompt length: the program compiled already.
    out = rdlm.generate(params, cfg, prompts + prompts[-1:], max_new_tokens=MAX_GEN_TOKS,
                        num_steps=R, stop_tokens=tok.stop_ids, prompt_len=16)
    for sample, ids in zip(samples, out.rows()):
        text = tok.decode(ids, skip_special_tokens=True)
        cut = min((text.index(s) for s in UNTIL if s in text), default=len(text))
        assert sample["resps"][0][0] == text[:cut]
        assert not any(s in sample["resps"][0][0] for s in UNTIL)


def test_rolling_loglikelihood_equals_rdlm_forward(evaluation, tiny_run):
    _, cfg, params = tiny_run
    tok = load_tokenizer("chars")
    samples = evaluation["samples"]["rdlm_roll"]
    texts = [s["arguments"][0][0] for s in samples]
    want = [s for s, _ in direct_scores(params, cfg, [([tok.bos_id], tok.encode(t))
                                                      for t in texts], R)]
    np.testing.assert_allclose([s["resps"][0][0] for s in samples], want, rtol=1e-5, atol=1e-4)


def test_rolling_windows_of_max_length(tiny_run):
    """A text longer than max_length is scored in lm-eval's rolling windows, each token once."""
    path, cfg, params = tiny_run
    tok = load_tokenizer("chars")
    lm = RDLM(checkpoint=str(path), num_steps=R, batch_size=4, max_length=16)
    text = LONG_TEXT
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        tok.encode(text), prefix_token=tok.bos_id, max_seq_len=16, context_len=1)]
    assert len(windows) == 3
    want = sum(s for s, _ in direct_scores(params, cfg, windows, R))
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert got[0] == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_one_compiled_program_serves_every_r(model, tiny_run):
    path, cfg, params = tiny_run
    tok = load_tokenizer("chars")
    requests = [Instance("loglikelihood", {}, ("2+3=", " 5"), 0)]
    model.loglikelihood(requests)  # compiled (if not already) at r = 2
    compiled = score_batch._cache_size()
    deeper = model.at(5)  # the same params, another r
    assert RDLM(checkpoint=str(path), num_steps=5, batch_size=4).options == deeper.options
    got = deeper.loglikelihood(requests)[0]
    assert score_batch._cache_size() == compiled
    want = direct_scores(params, cfg, [(tok.prompt("2+3="), tok.encode(" 5"))], 5)[0]
    assert got[0] == pytest.approx(want[0], rel=1e-5, abs=1e-4)
    assert got[0] != pytest.approx(model.loglikelihood(requests)[0][0], abs=1e-6)


def test_adaptive_exit_and_cache_budget_reach_generation(tiny_run):
    path, cfg, params = tiny_run
    tok = load_tokenizer("chars")
    lm = RDLM(checkpoint=str(path), num_steps=6, exit="latent-diff:0.5", cache_budget=2,
              batch_size=2)
    request = Instance("generate_until", {}, ("abc", {"until": ["zz"], "max_gen_toks": 4}), 0)
    text = lm.generate_until([request])[0]
    out = rdlm.generate(params, cfg, [tok.prompt("abc")] * 2, max_new_tokens=4, num_steps=6,
                        exit="latent-diff:0.5", cache_budget=2, stop_tokens=tok.stop_ids,
                        prompt_len=16)  # the model's batch size and prompt bucket
    assert text == tok.decode(out.rows()[0], skip_special_tokens=True).split("zz")[0]
    assert 1 <= lm.mean_steps < 6  # the exit stopped some tokens early


def test_chat_template_and_system_prompt(tmp_path):
    """A tokenizer with Huginn's chat tokens, kept in the run directory: lm-eval's
    apply_chat_template / system_instruction put the task in Huginn's chat format."""
    cfg = Config(model=model_preset("tiny", vocab_size=320))
    run = tmp_path / "run"
    save_params(run / "checkpoints" / "1", cfg, rdlm.init_params(cfg.model, jax.random.key(1)))
    params = load_params(run)[1]
    train_bpe(run / "tokenizer.json", SPECIALS, vocab_size=300)
    tok = HFTokenizer(run / "tokenizer.json")
    lm = RDLM(checkpoint=str(run / "checkpoints" / "1"), num_steps=R, batch_size=4)
    assert lm.tokenizer.name == tok.name  # found in the run directory
    folder = write_tasks(tmp_path / "tasks")
    result = lm_eval.simple_evaluate(
        model=lm, tasks=["rdlm_mc"], task_manager=TaskManager(include_path=str(folder),
                                                              include_defaults=False),
        apply_chat_template=True, system_instruction="Be brief.", log_samples=True, limit=1)
    sample = result["samples"]["rdlm_mc"][0]
    context = sample["arguments"][0][0]
    assert context == tok.chat_text([{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": MC_DOCS[0]["question"]}])
    ids = lm.tok_encode(context)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id  # the template's own BOS
    rows = []
    for context, continuation in sample["arguments"]:
        # lm-eval moves the context's trailing whitespace (the template's "\n\n") into the
        # continuation and splits the encoding of the whole (TemplateLM._encode_pair).
        head = context.rstrip()
        whole = tok.encode(context + continuation)
        rows.append((whole[:len(tok.encode(head))], whole[len(tok.encode(head)):]))
    want = direct_scores(params, cfg.model, rows, R)
    np.testing.assert_allclose([r[0][0] for r in sample["resps"]], [w[0] for w in want],
                               rtol=1e-5, atol=1e-4)


def test_chat_template_needs_the_chat_tokens(model):
    with pytest.raises(ConfigError, match="begin_header"):
        model.chat_template(True)


@pytest.mark.parametrize("args, match", [
    ({"num_step": 4}, "unknown model_args key 'num_step' \\(did you mean 'num_steps'\\?\\)"),
    ({"exit": "kl:abc"}, "exit='kl:abc'.*e.g. exit=kl:1e-3"),
    ({"exit": "kll"}, "unknown exit criterion 'kll' \\(did you mean 'kl'\\?\\)"),
    ({"num_steps": "many"}, "num_steps='many' must be an integer"),
    ({"dtype": "float16"}, "dtype='float16' must be float32 or bfloat16"),
    ({"param_dtype": "float16"}, "param_dtype='float16' must be float32 or bfloat16"),
    ({"max_length": 1000}, "max_length=1000 exceeds the model's max_seq_len=64"),
    ({"tensor": "0"}, "tensor=0 must be >= 1"),
    ({"tensor": 2}, "the fixed axes \\(2 devices\\) must divide the device count"),
])
def test_bad_model_args_are_named(tiny_run, args, match):
    with pytest.raises(ConfigError, match=match):
        RDLM(checkpoint=str(tiny_run[0]), **args)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint=.*does not exist"):
        RDLM(checkpoint=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="needs checkpoint=DIR"):
        get_model("rdlm").create_from_arg_string("num_steps=4")


def test_model_args_from_the_command_line_win_over_its_batch_size(tiny_run):
    lm = get_model("rdlm").create_from_arg_string(
        f"checkpoint={tiny_run[0]},num_steps=3,batch_size=2,continuous_cot=true",
        {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"})
    assert (lm.batch_size, lm.num_steps, lm.options.continuous_cot) == (2, 3, True)


def test_command_line_names_the_model():
    assert with_model(["--tasks", "x"]) == ["--model", "rdlm", "--tasks", "x"]
    assert with_model(["run", "--tasks", "x"]) == ["run", "--model", "rdlm", "--tasks", "x"]
    assert with_model(["--model", "hf", "--tasks", "x"])[:2] == ["--model", "hf"]
    assert with_model(["ls", "tasks"]) == ["ls", "tasks"]


def test_one_token_stop_strings_become_stop_tokens():
    tok = load_tokenizer("chars")
    assert stop_token_ids(tok, ["\n", "e.", "É"]) == (*tok.stop_ids, tok.encode("\n")[0])


def test_data_parallel_over_two_devices_gives_the_same_numbers(model, tiny_run):
    """With two (host) devices the batch is split over the "data" axis, and under
    continuous_batching each device takes its share of the requests; with tensor=2 both split
    the weights of one batch (or of one queue's rows); same results."""
    pairs = [("2+3=", " 5"), ("a b c d", " e"), ("is 7 odd?", " yes")]
    contexts = ["abc", "2+3=", "hello there", "x", "a b c d e"]
    code = (
        "import json, os\n"
        f"os.environ['XLA_FLAGS'] = '{xla_flags(2)}'\n"
        "from lm_eval.api.instance import Instance\n"
        "from rdlm.lm_eval import RDLM\n"
        f"lm = RDLM(checkpoint={str(tiny_run[0])!r}, num_steps={R}, batch_size=3)\n"
        f"reqs = [Instance('loglikelihood', {{}}, p, i) for i, p in enumerate({pairs!r})]\n"
        f"rows = RDLM(checkpoint={str(tiny_run[0])!r}, num_steps=6, exit='latent-diff:0.5',\n"
        "            batch_size=2, continuous_batching='true')\n"
        "gens = [Instance('generate_until', {}, (c, {'until': ['zz'], 'max_gen_toks': 5}), i)\n"
        f"        for i, c in enumerate({contexts!r})]\n"
        f"tp = RDLM(checkpoint={str(tiny_run[0])!r}, num_steps={R}, batch_size=3, tensor=2)\n"
        f"tp_rows = RDLM(checkpoint={str(tiny_run[0])!r}, num_steps=6, exit='latent-diff:0.5',\n"
        "               batch_size=2, continuous_batching='true', tensor=2)\n"
        "print(json.dumps({'devices': lm.mesh.size, 'batch': lm.batch_size,\n"
        "                  'out': lm.loglikelihood(reqs), 'gen': rows.generate_until(gens),\n"
        "                  'tp_shape': dict(tp.mesh.shape), 'tp_batch': tp.batch_size,\n"
        "                  'tp_out': tp.loglikelihood(reqs),\n"
        "                  'tp_gen': tp_rows.generate_until(gens)}))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert (result["devices"], result["batch"]) == (2, 4)  # rounded up to split evenly
    want = model.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    np.testing.assert_allclose([o[0] for o in result["out"]], [w[0] for w in want], rtol=1e-5,
                               atol=1e-4)
    assert [o[1] for o in result["out"]] == [w[1] for w in want]
    lockstep = RDLM(checkpoint=str(tiny_run[0]), num_steps=6, exit="latent-diff:0.5", batch_size=2)
    gen = lockstep.generate_until(
        [Instance("generate_until", {}, (c, {"until": ["zz"], "max_gen_toks": 5}), i)
         for i, c in enumerate(contexts)])
    assert result["gen"] == gen
    # tensor=2: one data-parallel group of both devices, the batch as asked.
    assert (result["tp_shape"], result["tp_batch"]) == ({"data": 1, "fsdp": 1, "tensor": 2}, 3)
    np.testing.assert_allclose([o[0] for o in result["tp_out"]], [w[0] for w in want],
                               rtol=1e-5, atol=1e-4)
    assert [o[1] for o in result["tp_out"]] == [w[1] for w in want]
    assert result["tp_gen"] == gen


def test_two_hosts_score_and_generate_what_one_device_does(model, tiny_run):
    """Two processes of 2 devices each (gloo), one mesh over the 4: each process scores every
    request and generates every continuation, equal to one device's."""
    pairs = [("2+3=", " 5"), ("a b c d", " e"), ("is 7 odd?", " yes")]
    contexts = ["abc", "2+3=", "hello there", "x", "a b c d e"]
    port = _free_port()
    code = (
        "import json, sys\n"
        "from rdlm.config import MeshConfig\n"
        "from rdlm.runtime.distributed import maybe_initialize_distributed\n"
        f"maybe_initialize_distributed(MeshConfig(coordinator_address='127.0.0.1:{port}',\n"
        "                                         num_processes=2, process_id=int(sys.argv[1])))\n"
        "from lm_eval.api.instance import Instance\n"
        "from rdlm.lm_eval import RDLM\n"
        f"lm = RDLM(checkpoint={str(tiny_run[0])!r}, num_steps={R}, batch_size=4)\n"
        f"reqs = [Instance('loglikelihood', {{}}, p, i) for i, p in enumerate({pairs!r})]\n"
        f"rows = RDLM(checkpoint={str(tiny_run[0])!r}, num_steps=6, exit='latent-diff:0.5',\n"
        "            batch_size=4, continuous_batching='true')\n"
        "gens = [Instance('generate_until', {}, (c, {'until': ['zz'], 'max_gen_toks': 5}), i)\n"
        f"        for i, c in enumerate({contexts!r})]\n"
        "print(json.dumps({'devices': lm.mesh.size, 'out': lm.loglikelihood(reqs),\n"
        "                  'gen': rows.generate_until(gens)}))\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(2)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    want = model.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    lockstep = RDLM(checkpoint=str(tiny_run[0]), num_steps=6, exit="latent-diff:0.5", batch_size=2)
    gen = lockstep.generate_until(
        [Instance("generate_until", {}, (c, {"until": ["zz"], "max_gen_toks": 5}), i)
         for i, c in enumerate(contexts)])
    for result in results:
        assert result["devices"] == 4
        np.testing.assert_allclose([o[0] for o in result["out"]], [w[0] for w in want],
                                   rtol=1e-5, atol=1e-4)
        assert [o[1] for o in result["out"]] == [w[1] for w in want]
        assert result["gen"] == gen


def test_without_lm_eval_the_import_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)  # as if not installed
    spec = importlib.util.spec_from_file_location("rdlm_lm_eval_copy",
                                                  sys.modules["rdlm.lm_eval"].__file__)
    with pytest.raises(ImportError, match=r"pip install 'rdlm\[eval\]'"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_length_buckets_pad_less_than_a_quarter_of_a_row():
    lengths = [bucket_length(n, 256) for n in range(1, 257)]
    assert sorted(set(lengths)) == [16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160,
                                    192, 224, 256]
    assert all(n <= b < max(16, 1.25 * n) + 1 for n, b in zip(range(1, 257), lengths))
    assert bucket_length(40, 36) == 40  # capped at max_length, never below the row


def test_huginn_layout_directory_gives_the_same_numbers(model, tiny_run, tmp_path):
    """The checkpoint as a Hugging Face directory in Huginn-0125's layout (`rdlm convert`)."""
    from rdlm.interop import save_huginn
    _, cfg, params = tiny_run
    save_huginn(cfg, params, tmp_path / "hf")
    with pytest.raises(ConfigError, match="keeps no tokenizer.json.*model_args tokenizer=PATH"):
        RDLM(checkpoint=str(tmp_path / "hf"))  # no tokenizer.json beside the weights
    hf = RDLM(checkpoint=str(tmp_path / "hf"), num_steps=R, batch_size=4, tokenizer="chars")
    assert hf.cfg.dtype == "float32" and hf.num_steps == R
    requests = [Instance("loglikelihood", {}, pair, i)
                for i, pair in enumerate([("2+3=", " 5"), ("a b c d", " e")])]
    np.testing.assert_allclose([s for s, _ in hf.loglikelihood(requests)],
                               [s for s, _ in model.loglikelihood(requests)], rtol=1e-6, atol=1e-5)
    # param_dtype=bfloat16 loads either kind of checkpoint's parameters in bfloat16.
    for checkpoint in (tmp_path / "hf", tiny_run[0]):
        half = RDLM(checkpoint=str(checkpoint), tokenizer="chars", param_dtype="bfloat16")
        assert {str(x.dtype) for x in jax.tree.leaves(half.params)} == {"bfloat16"}


def test_continuous_batching_generates_what_lockstep_batches_do(tiny_run):
    """model_args continuous_batching=true: the requests of a task go through one queue of
    batch_size rows, with the same greedy continuations as the lockstep batches."""
    path, _, _ = tiny_run
    requests = [Instance("generate_until", {}, (context, {"until": ["zz"], "max_gen_toks": 5}), i)
                for i, context in enumerate(["abc", "2+3=", "hello there", "x", "a b c d e"])]
    options = dict(checkpoint=str(path), num_steps=6, exit="latent-diff:0.5", batch_size=2)
    lockstep = RDLM(**options)
    continuous = RDLM(continuous_batching="true", **options)
    assert continuous.generate_until(requests) == lockstep.generate_until(requests)
    assert continuous.generation_stats == lockstep.generation_stats
    assert continuous.mean_steps < 6  # the exit stopped tokens early, in both
