"""Answers of a continuous-thought model: greedy decoding after the thoughts, and accuracy.

Decoding runs on the generation engine (`rdlm.generate`): the prompt's ``<latent>`` positions
become continuous thoughts once, one position after the other into the KV cache
(`rdlm.generation.ThoughtConfig`), and each answer token is one cached step.
"""

from __future__ import annotations

from typing import Any, Sequence

from rdlm.coconut.curriculum import CoconutConfig, eval_depth, eval_prompt
from rdlm.coconut.thoughts import Params
from rdlm.config import Config, ModelConfig
from rdlm.data.render import parse_answer
from rdlm.data.tasks import Example, example_at, make_task
from rdlm.data.tokenizer import load_tokenizer
from rdlm.generation import GenerateOutput, ThoughtConfig, generate


def generate_after_thoughts(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
                            *, num_steps: int, latent_id: int, max_new_tokens: int,
                            eos_id: int | None, substitute: bool = True,
                            shift_sees_thoughts: bool = False, prompt_len: int | None = None
                            ) -> GenerateOutput:
    """Greedy tokens after each prompt at ``num_steps`` core iterations from the zero state.

    ``substitute``: the prompt's ``latent_id`` positions are continuous thoughts (Coconut);
    False keeps them ordinary tokens (the pause baseline). Generated tokens are always ordinary.
    A row ends after ``eos_id`` (kept; None: never). ``prompt_len`` left-pads every batch to one
    length, so that batches of different prompts share one compilation.
    """
    thoughts = ThoughtConfig(latent_id, shift_sees_thoughts) if substitute else None
    return generate(params, cfg, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                    num_steps=num_steps, stop_tokens=() if eos_id is None else (eos_id,),
                    thoughts=thoughts, prompt_len=prompt_len)


def _batches(prompts: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Consecutive batches of ``batch_size`` prompts, the last one filled up with copies of its
    first prompt: one batch shape, so one compilation."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        out.append(chunk + [chunk[0]] * (batch_size - len(chunk)))
    return out


def evaluate_method(params: Params, cfg: Config, cc: CoconutConfig,
                    examples: Sequence[Example] | None = None, batch_size: int = 64
                    ) -> dict[str, Any]:
    """Accuracy and mean generated tokens (language tokens incl. EOS, plus the k·c thoughts the
    model computes: the paper's count) of greedy answers."""
    tok = load_tokenizer(cfg.data.tokenizer)
    if examples is None:
        task = make_task(cfg.data.task, cfg.data.difficulty, cfg.data.task_args)
        examples = [example_at(task, cc.eval_split, i, cfg.seed) for i in range(cc.eval_examples)]
    r = int(eval_depth(cfg, cc).n_no_grad)
    batch_size = min(batch_size, len(examples))  # no padding rows beyond the examples
    prompts = [eval_prompt(e, tok, cc) for e in examples]
    prompt_len = max(map(len, prompts), default=1)
    correct, generated, predictions = 0, 0, []
    for number, batch in enumerate(_batches(prompts, batch_size)):
        out = generate_after_thoughts(
            params, cfg.model, batch, num_steps=r, latent_id=tok.latent_id,
            max_new_tokens=cc.max_new_tokens, eos_id=tok.eos_id,
            substitute=cc.method == "coconut", shift_sees_thoughts=cc.shift_sees_thoughts,
            prompt_len=prompt_len)
        chunk = examples[number * batch_size:(number + 1) * batch_size]
        for e, row in zip(chunk, out.rows()):
            text = tok.decode(row)
            correct += parse_answer(text.replace("<eos>", "")) == e.answer
            generated += len(row) + cc.max_latents
            predictions.append({"answer": e.answer, "generated": text})
    n = max(len(examples), 1)
    return {"accuracy": correct / n, "generated_tokens": generated / n, "num_examples": len(examples),
            "num_steps": r, "predictions": predictions}
