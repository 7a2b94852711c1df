"""Scoring a parameter dict on examples: option ranking, greedy generation, exact match, test loss.

Every forward pass goes through `torch.func.functional_call`, so adapted weights are scored without
being written into the model.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import PreTrainedTokenizerBase

from metalora.data.collation import Encoder
from metalora.data.tasks import Example, Task
from metalora.method.batch import IGNORE_INDEX
from metalora.method.loss import count_target_tokens, target_logits

Params = dict[str, torch.Tensor]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalise(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def final_number(text: str) -> str | None:
    """The last number in `text` without thousands separators or a trailing `.0`, or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def exact_match(prediction: str, target: str) -> bool:
    """Normalised exact match of the prediction's first line against the target.

    A target that is a number (GSM8K-style) is compared with the last number on that line, so
    "The answer is 1,200." matches "1200".
    """
    first_line = prediction.strip().split("\n")[0]
    target_number = final_number(target)
    if target_number is not None and target.strip().replace(",", "") == target_number:
        return final_number(first_line) == target_number
    return normalise(first_line) == normalise(target)


@torch.no_grad()
def test_losses(model: torch.nn.Module, params: Params, encoder: Encoder, task: Task, examples: list[Example],
                batch_size: int) -> tuple[float, list[float]]:  # fmt: skip
    """The token-weighted mean target loss over `examples` (cross-entropy per target token), and each example's own
    mean over its target tokens, in the examples' order; `batch_size` rows per forward pass."""
    batches = encoder.batches(task, examples, batch_size, group_by_length=True)
    order = encoder.length_order(task, examples)  # the example behind each row of `batches`, in turn
    total_tokens = sum(count_target_tokens(b) for b in batches)
    total, per_item, row = 0.0, [math.nan] * len(examples), 0
    for batch in batches:
        logits, labels = target_logits(model, params, batch)
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        mean = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX)
        total += float(mean) * count_target_tokens(batch)
        per_token = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
        rows = (per_token.view(labels.shape).sum(-1) / (labels != IGNORE_INDEX).sum(-1)).tolist()
        for loss in rows:
            per_item[order[row]] = loss
            row += 1
    return total / total_tokens, per_item


def test_loss(model: torch.nn.Module, params: Params, encoder: Encoder, task: Task, examples: list[Example],
              batch_size: int) -> float:  # fmt: skip
    """The token-weighted mean target loss over `examples` (`test_losses` without the per-example losses)."""
    return test_losses(model, params, encoder, task, examples, batch_size)[0]


@torch.no_grad()
def option_log_likelihoods(model: torch.nn.Module, params: Params, encoder: Encoder, task: Task,
                           examples: list[Example], batch_size: int) -> torch.Tensor:  # fmt: skip
    """The log-likelihood of each option's tokens after each example's prompt: [examples, options], options in the
    task's order; `batch_size` (example, option) rows per forward pass."""
    if not task.options:
        raise ValueError(f"task '{task.name}' has no options to rank")
    options = [encoder.target_ids(o) for o in task.options]
    rows = [(encoder.prompt_ids(task, e), o) for e in examples for o in options]
    scores = []
    for start in range(0, len(rows), batch_size):
        logits, labels = target_logits(model, params, encoder.collate(rows[start : start + batch_size]))
        logprobs = torch.log_softmax(logits, dim=-1)
        mask = labels != IGNORE_INDEX
        picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.extend((picked * mask).sum(-1).tolist())
    return torch.tensor(scores).view(len(examples), len(options))


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which this transformers version passes the KV cache into a forward pass and returns it:
    `cache` in transformers 5 (where `past_key_values` is deprecated), `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, params: Params, prompts: list[list[int]], max_new_tokens: int,
                    pad_id: int, eos_id: int,
                    done: Callable[[list[int]], bool] | None = None) -> list[list[int]]:  # fmt: skip
    """Greedy decoding under a parameter dict with a KV cache (left-padded batch).

    Args:
        prompts: prompt token ids per row.
        max_new_tokens: tokens generated at most per row.
        eos_id: end-of-sequence token id (generation of a row stops there; it is not returned).
        done: called with a row's tokens after each new one; True stops that row (its tokens so far are
            returned), so the batch ends once no row can change what is scored.

    Returns:
        The generated token ids per row.
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True,
              "logits_to_keep": 1}  # fmt: skip
    cache = cache_argument(model)
    out_tokens: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for _ in range(max_new_tokens):
        out = functional_call(model, params, args=(), kwargs=kwargs)
        nxt = out.logits[:, -1].argmax(-1)
        # One device-to-host copy per generated token for the whole batch, not one per row.
        for i, token in enumerate(nxt.tolist()):
            if finished[i]:
                continue
            if token == eos_id:
                finished[i] = True
                continue
            out_tokens[i].append(token)
            finished[i] = done is not None and done(out_tokens[i])
        if all(finished):
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
        kwargs = {"input_ids": nxt.unsqueeze(-1), "attention_mask": mask, "position_ids": positions,
                  cache: getattr(out, cache), "use_cache": True}  # fmt: skip
    return out_tokens


def max_new_tokens_for(encoder: Encoder, task: Task) -> int:
    """Generation budget from the task's target lengths: the longest target's tokens plus a margin."""
    longest = max(len(encoder.target_ids(e.target)) for e in task.examples[:200])
    return min(longest + 4, encoder.max_target_tokens + 1)


def first_line_complete(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int]], bool]:
    """A `greedy_generate` stop rule for scoring by `exact_match`: a row is done once its first line is.

    `exact_match` reads the first line of the stripped prediction, so no token after a newline that follows
    some text can change the score. A row is decoded whole only when its newest token holds a newline.
    """

    def done(tokens: list[int]) -> bool:
        return (
            "\n" in tokenizer.decode(tokens[-1:])
            and "\n" in tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
        )

    return done


@functools.cache
def _task_match() -> object:
    # evaluate's hub metrics are scripts fetched at load time; the kit's own module loads offline.
    import evaluate

    return evaluate.load(str(Path(__file__).parent / "metrics" / "task_match.py"))


def match_rate(predictions: list[str], references: list[str], mode: str) -> float:
    """Share of matching predictions, computed by the kit's `evaluate` metric module.

    Args:
        predictions: chosen options or generated texts.
        mode: "option" (exact equality) or "text" (normalised exact match, see `exact_match`).

    Returns:
        A value in [0, 1].
    """
    return float(_task_match().compute(predictions=predictions, references=references, mode=mode)["match"])


@dataclass
class TaskScore:
    """A test set scored: the metric and its value, and per example the answer, whether it counted as correct and,
    for option ranking, every option's log-likelihood (empty lists for generation)."""

    metric: str
    value: float
    answers: list[str]
    correct: list[bool]
    option_scores: list[list[float]]


@torch.no_grad()
def generate_answers(model: torch.nn.Module, params: Params, encoder: Encoder, task: Task, examples: list[Example],
                     batch_size: int) -> list[str]:  # fmt: skip
    """Greedy generations for `examples` (decoded; generation stops once the first line is complete)."""
    budget = max_new_tokens_for(encoder, task)
    tokenizer = encoder.tokenizer
    done = first_line_complete(tokenizer)
    texts = []
    for start in range(0, len(examples), batch_size):
        prompts = [encoder.prompt_ids(task, e) for e in examples[start : start + batch_size]]
        outputs = greedy_generate(model, params, prompts, budget, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                  done)  # fmt: skip
        texts.extend(tokenizer.decode(tokens, skip_special_tokens=True) for tokens in outputs)
    return texts


def score_task(model: torch.nn.Module, params: Params, encoder: Encoder, task: Task, examples: list[Example],
               batch_size: int) -> TaskScore:  # fmt: skip
    """Score `examples` with the task's metric: option accuracy, or exact match of greedy generations. The value is
    computed by the kit's `evaluate` metric module; each example's `correct` by the same comparison."""
    references = [e.target for e in examples]
    if task.options:
        scores = option_log_likelihoods(model, params, encoder, task, examples, batch_size)
        answers = [task.options[i] for i in scores.argmax(-1).tolist()]
        correct = [a == r for a, r in zip(answers, references, strict=True)]
        return TaskScore("accuracy", match_rate(answers, references, "option"), answers, correct, scores.tolist())
    answers = generate_answers(model, params, encoder, task, examples, batch_size)
    correct = [exact_match(a, r) for a, r in zip(answers, references, strict=True)]
    return TaskScore("exact_match", match_rate(answers, references, "text"), answers, correct, [[] for _ in answers])


def best_constant_answer(task: Task, examples: list[Example]) -> tuple[str, float]:
    """The highest score one fixed answer reaches on `examples` under the task's metric.

    It is the floor a model that ignores its input can reach (for a label set, the most common label's
    share of the test items), so a method near it has learned an answer preference, not the task. The
    candidates are the task's options, or else the examples' own targets; picking the best of them with
    the test labels makes this a ceiling on every constant answer, which is what a floor for comparison needs.

    Returns:
        (metric name, value in [0, 1]).
    """
    references = [e.target for e in examples]
    metric, mode = ("accuracy", "option") if task.options else ("exact_match", "text")
    candidates = task.options or sorted(set(references))
    return metric, max((match_rate([c] * len(references), references, mode) for c in candidates), default=0.0)
