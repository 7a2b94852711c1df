"""Every common model family through the kit: a 2-layer random model of each (`tiny-random-<family>`) meta-trains
with every algorithm, evaluates by generation and by option ranking, decodes as `generate` does, reloads its
adapter in plain peft and trains over a bfloat16 base."""

import math
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from smoke import SMOKE
from torch.func import functional_call

from metalora.config import ModelConfig, load_config
from metalora.data.splits import EvalPools
from metalora.data.tasks import Example, Task
from metalora.evaluation.fewshot import AdaptSettings, CurveLabel, Scorer, evaluate_init, evaluation_points, point_key
from metalora.evaluation.scoring import greedy_generate
from metalora.modeling.build import load_base
from metalora.modeling.lora import attach_lora, lora_params, save_adapter
from metalora.modeling.models import TINY_FAMILIES, TINY_SLIDING_WINDOW, load_model
from metalora.training.parts import build_parts
from metalora.training.step import training_step

FAMILIES = sorted(TINY_FAMILIES)
ALGORITHMS = {
    "metalora": [],
    "metalora-second-order": ["meta.first_order=false"],
    "reptile": ["meta.algorithm=reptile"],
    "fomaml": ["meta.algorithm=fomaml"],
    "multitask": ["meta.algorithm=multitask"],
}


def family_config(family: str, *overrides: str):
    return load_config(SMOKE, [f"model.name=tiny-random-{family}", "lora.dropout=0.0", *overrides])


def nudged(parts) -> None:
    """Non-zero LoRA B weights, so that every LoRA weight takes part (B = 0 makes the A gradients zero)."""
    with torch.no_grad():
        for name, tensor in parts.shared.items():
            if "lora_B" in name:
                tensor.copy_(torch.randn_like(tensor, generator=torch.Generator().manual_seed(len(name))) * 0.05)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_takes_a_finite_step_that_moves_its_shared_weights(family, algorithm):
    parts = build_parts(family_config(family, *ALGORITHMS[algorithm]))
    if algorithm != "fomaml":
        nudged(parts)
    before = {k: v.detach().clone() for k, v in parts.shared.items()}
    result = training_step(parts, 0, Accelerator(cpu=True))
    assert result.stepped and math.isfinite(result.grad_norm) and result.grad_norm > 0
    assert all(math.isfinite(s.query_loss) for s in result.tasks)
    moved = [k for k, v in parts.shared.items() if not torch.equal(v.detach(), before[k])]
    assert len(moved) > len(before) // 2, f"{family}/{algorithm}: only {len(moved)} of {len(before)} tensors moved"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_target_modules_adapt_the_attention_projections_of_every_family(family):
    parts = build_parts(family_config(family))
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in parts.shared}
    fused = {"qkv_proj", "o_proj"}
    assert adapted == (fused if family == "phi3" else {"q_proj", "k_proj", "v_proj", "o_proj"})


@pytest.mark.parametrize("family", FAMILIES)
def test_few_shot_evaluation_scores_by_generation_and_by_option_ranking(family):
    cfg = family_config(family)
    model, encoder = load_base(cfg)
    model = attach_lora(model, cfg.lora, seed=0)
    words = ["red", "green", "blue", "black", "white", "grey", "pink", "brown", "gold", "teal"]
    draft = Task("colour_copy", "Repeat the word.", "exact_match",
                 [Example(f"colour_copy:{i}", w, w) for i, w in enumerate(words)])  # fmt: skip
    # A known answer for generation: the test items' targets are the first lines transformers' own generate gives for
    # their prompts, so the unadapted model scores exactly 1. A long target among the shots fixes the generation
    # budget at its cap whatever the test targets are.
    budget = encoder.max_target_tokens + 1
    known = model_first_lines(model, encoder, draft, draft.examples[:4], budget)
    free = replace(draft, examples=[replace(e, target=t) for e, t in zip(draft.examples[:4], known, strict=True)]
                   + draft.examples[4:-1] + [replace(draft.examples[-1], target=" ".join(words * 8))])  # fmt: skip
    labelled = Task("parity", "Is the number even?", "accuracy",
                    [Example(f"parity:{i}", str(i), "yes" if i % 2 == 0 else "no") for i in range(10)],
                    options=["yes", "no"])  # fmt: skip
    pools = {t.name: EvalPools(t, adapt=t.examples[4:], test=t.examples[:4]) for t in (free, labelled)}
    fresh = {k: v.detach().clone() for k, v in lora_params(model).items()}
    points = evaluation_points(list(pools), [0, 3], 1)
    kept = KeptAnswers()
    rows = evaluate_init(Scorer(model, encoder, max_test=4, batch_size=4, samples=True, record=kept),
                         CurveLabel("lora"), fresh, AdaptSettings(2, 1e-3), pools, points)  # fmt: skip
    assert {(r.task, r.n_shots) for r in rows} == {(t, n) for t in pools for n in (0, 3)}
    assert all(r.finite and 0.0 <= r.value <= 1.0 and math.isfinite(r.test_loss) for r in rows)
    assert {r.metric for r in rows} == {"exact_match", "accuracy"}
    # Unadapted, option ranking scores what the options' log-likelihoods say, computed here one sequence at a time,
    # and generation scores the answers transformers' generate gives.
    unadapted = {r.task: r.value for r in rows if r.n_shots == 0}
    assert unadapted["parity"] == option_accuracy_by_hand(model, encoder, labelled, pools["parity"].test)
    assert unadapted["colour_copy"] == 1.0
    # Every answer behind those scores: per point, the share of items marked correct is the score, and the items'
    # losses weighted by their target tokens give the test loss.
    for row in rows:
        answers = kept.answers[point_key(row)]
        test = pools[row.task].test
        assert [a.example_id for a in answers] == [e.id for e in test]
        assert sum(a.correct for a in answers) / len(answers) == row.value
        tokens = [len(encoder.target_ids(e.target)) for e in test]
        assert sum(a.loss * n for a, n in zip(answers, tokens, strict=True)) / sum(tokens) == pytest.approx(
            row.test_loss, rel=1e-5)
        assert all(a.prompt == encoder.tokenizer.decode(encoder.prompt_ids(pools[row.task].task, e))
                   for a, e in zip(answers, test, strict=True))  # fmt: skip
    # Unadapted generation answers what transformers' generate answers; option ranking picks the best-scored option.
    generated = kept.answers[("heldout", "lora", -1, "colour_copy", 0, 0)]
    assert [a.answer.strip().split("\n")[0].strip() for a in generated] == known
    ranked = kept.answers[("heldout", "lora", -1, "parity", 0, 0)]
    assert all(a.answer == labelled.options[a.option_scores.index(max(a.option_scores))] for a in ranked)
    assert all(len(a.option_scores) == 2 for a in ranked) and all(a.option_scores == [] for a in generated)


class KeptAnswers:
    """The per-item answers of each point scored, by point (a PointRecord that holds no earlier points)."""

    def __init__(self):
        self.answers = {}

    def done(self, key):
        return None

    def record(self, row, answers):
        self.answers[point_key(row)] = answers


def model_first_lines(model, encoder, task, examples, budget: int) -> list[str]:
    """The first line of each example's greedy continuation, by transformers' `generate`."""
    tokenizer = encoder.tokenizer
    lines = []
    with torch.no_grad():
        for example in examples:
            prompt = encoder.prompt_ids(task, example)
            ids = torch.tensor([prompt])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            text = tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()
            lines.append(text.splitlines()[0].strip() if text else "")
    return lines


def option_accuracy_by_hand(model, encoder, task, examples) -> float:
    """Accuracy of picking, per example, the option whose tokens the model finds likeliest after the prompt."""
    correct = 0
    with torch.no_grad():
        for example in examples:
            prompt = encoder.prompt_ids(task, example)
            likelihoods = []
            for option in task.options:
                tokens = encoder.target_ids(option)
                logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                likelihoods.append(sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)))
            correct += task.options[likelihoods.index(max(likelihoods))] == example.target
    return correct / len(examples)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_returns_the_tokens_generate_returns(family):
    model, tokenizer = load_model(ModelConfig(name=f"tiny-random-{family}"), weight_first_logits=False)
    model.eval()
    # Prompts longer than the sliding window of the families that have one, of different lengths (left padding).
    prompts = [tokenizer("the quick brown fox jumps over the lazy dog, twice")["input_ids"],
               tokenizer("3 + 4 = 7; 5 + 6 =")["input_ids"]]  # fmt: skip
    assert max(len(p) for p in prompts) > TINY_SLIDING_WINDOW
    ours = greedy_generate(model, {}, prompts, max_new_tokens=6, pad_id=tokenizer.pad_token_id, eos_id=-1)
    for prompt, generated in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=None)  # fmt: skip
        assert generated == reference[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_adapter_reloads_in_plain_peft_with_identical_logits(family, tmp_path):
    cfg = family_config(family, "speed.weight_first_logits=false")
    parts = build_parts(cfg)
    nudged(parts)
    parts.model.eval()
    save_adapter(parts.model, tmp_path / "adapter")
    batch = {"input_ids": torch.tensor([[5, 17, 42, 99, 3, 64]])}
    with torch.no_grad():
        ours = functional_call(parts.model, dict(parts.shared), args=(), kwargs=batch).logits
        base, _ = load_model(cfg.model, weight_first_logits=False)
        reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        theirs = reloaded(**batch).logits
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bfloat16_base_trains_float32_lora_weights(family):
    parts = build_parts(family_config(family, "model.dtype=bfloat16"))
    assert {p.dtype for n, p in parts.model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {t.dtype for t in parts.shared.values()} == {torch.float32}
    nudged(parts)
    result = training_step(parts, 0, Accelerator(cpu=True))
    assert result.stepped and all(math.isfinite(s.query_loss) for s in result.tasks)


def test_all_linear_adapts_every_linear_layer_but_the_output_projection():
    parts = build_parts(family_config("phi3", "lora.target_modules=[all-linear]"))
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in parts.shared}
    assert adapted == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_a_target_module_the_model_lacks_is_named_with_the_linear_layers_it_has():
    from metalora.config import ConfigError

    with pytest.raises(ConfigError, match=r"\['q_prj'\] name no linear layer .*'gate_proj'.*all-linear"):
        build_parts(family_config("llama", "lora.target_modules=[q_prj,v_proj]"))
    with pytest.raises(ConfigError, match=r"lora.target_modules.*\[all-linear\] alone"):
        family_config("llama", "lora.target_modules=[all-linear,q_proj]")


def test_an_unknown_tiny_family_lists_the_known_ones():
    from metalora.modeling.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="no tiny random model of family 'gpt9'.*tiny-random-qwen2"):
        load_model(ModelConfig(name="tiny-random-gpt9"))
