"""Few-shot evaluation: no leaks from the test set, 0-shot means no adaptation, scoring equivalences."""

import math

import pytest
import torch
from split_reference import heldout_pools

from metalora.config import LoraConfig
from metalora.data.collation import Encoder
from metalora.data.tasks import Example, Task
from metalora.evaluation.fewshot import (
    AdaptSettings,
    CurveLabel,
    Scorer,
    adapt_on_shots,
    adapter_init,
    constant_answer_rows,
    draw_shots,
    evaluate_init,
    evaluation_points,
    snapshot_lora,
)
from metalora.evaluation.scoring import (
    best_constant_answer,
    exact_match,
    first_line_complete,
    greedy_generate,
    normalise,
    score_task,
)
from metalora.method.loss import target_logits
from metalora.modeling.lora import attach_lora, lora_params, save_adapter


@pytest.fixture
def setup(tiny):
    model, tokenizer = tiny
    model = attach_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    encoder = Encoder(tokenizer, "{instruction}\nInput: {input}\nOutput:")
    examples = [Example(f"t:{i}", f"{i} apples", "yes" if i % 2 else "no") for i in range(40)]
    task = Task("t", "Is it odd?", "accuracy", examples, options=["yes", "no"])
    return model, tokenizer, encoder, task


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("Paris.", "paris", True),
        ("  The Paris\nInput: x", "Paris", True),
        ("1,200 apples", "1200", True),
        ("-7", "-7", True),
        ("7", "-7", False),
        ("21x^2", "21x^2", True),
        ("21x^3", "21x^2", False),
        ("dbu", "dbu ", True),
        ("an apple", "apple", True),
        ("55\n56", "55", True),
    ],
)
def test_exact_match_normalisation(prediction, target, expected):
    assert exact_match(prediction, target) is expected


def test_normalise_drops_case_punctuation_articles_and_spaces():
    assert normalise("  The  Quick, brown FOX! ") == "quick brown fox"


def test_shots_never_come_from_the_test_set(setup):
    _, _, _, task = setup
    pools = heldout_pools(task, n_test=10, seed=0)
    test_ids = {e.id for e in pools.test}
    for n in (1, 5, 10, 30):
        for seed in range(5):
            shots = draw_shots(pools, n, seed)
            assert len(shots) == n and not {e.id for e in shots} & test_ids
    with pytest.raises(Exception, match="adaptation pool has 30"):
        draw_shots(pools, 31, 0)


def test_zero_shots_means_no_adaptation(setup):
    model, _, encoder, task = setup
    pools = heldout_pools(task, n_test=10, seed=0)
    init = snapshot_lora(model)
    settings = AdaptSettings(steps=5, lr=1e-2)
    assert adapt_on_shots(model, init, encoder, pools, [], settings, 0) is init
    adapted = adapt_on_shots(model, init, encoder, pools, draw_shots(pools, 4, 0), settings, 0)
    assert any(not torch.equal(adapted[k], init[k]) for k in init)


def test_option_ranking_equals_a_brute_force_loop(setup):
    model, _, encoder, task = setup
    params = lora_params(model)
    examples = task.examples[:6]
    fast = score_task(model, params, encoder, task, examples, batch_size=5).answers
    slow = []
    for example in examples:
        scores = []
        for option in task.options:
            batch = encoder.collate([(encoder.prompt_ids(task, example), encoder.target_ids(option))])
            with torch.no_grad():
                logits, labels = target_logits(model, params, batch)
            scores.append(float(torch.log_softmax(logits, -1)[0].gather(-1, labels[0].unsqueeze(-1)).sum()))
        slow.append(task.options[max(range(len(scores)), key=scores.__getitem__)])
    assert fast == slow


def test_a_stop_rule_ends_rows_early_and_keeps_what_they_generated(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer("3 + 4 =")["input_ids"], tokenizer("hello there, world")["input_ids"]]
    full = greedy_generate(model, {}, prompts, max_new_tokens=6, pad_id=tokenizer.pad_token_id, eos_id=-1)
    assert full[1][:2] != full[0][:2]

    def done(tokens: list[int]) -> bool:
        return tokens == full[0][:2]

    stopped = greedy_generate(model, {}, prompts, max_new_tokens=6, pad_id=tokenizer.pad_token_id, eos_id=-1,
                              done=done)  # fmt: skip
    # The first row stops after two tokens; the second never matches the rule and runs the whole budget.
    assert stopped == [full[0][:2], full[1]]


@pytest.mark.parametrize(
    ("text", "complete"),
    [(" 565\n", True), (" 565\nInput: 3", True), ("\n", False), ("\n\n 56", False), (" 56", False), ("", False)],
)
def test_first_line_rule_sees_a_newline_after_text(tiny, text, complete):
    _, tokenizer = tiny
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    done = first_line_complete(tokenizer)
    # Applied as generation does: after each new token, so the rule fires at the first token that completes
    # the first line and never before.
    fired = [done(tokens[: i + 1]) for i in range(len(tokens))]
    assert any(fired) is complete
    if complete:
        first = fired.index(True)
        assert exact_match(tokenizer.decode(tokens[: first + 1]), "565") == exact_match(text, "565")


def test_adapter_init_reads_weights_without_changing_the_model(setup, tmp_path):
    model, _, _, _ = setup
    fresh = snapshot_lora(model)
    moved = {k: v + 0.5 for k, v in fresh.items()}
    save_adapter(model, tmp_path / "a", params=moved)
    loaded = adapter_init(model, tmp_path / "a")
    for name in fresh:
        assert torch.equal(loaded[name], moved[name])
        assert torch.equal(lora_params(model)[name], fresh[name])


def test_evaluate_init_rows(setup):
    model, _, encoder, task = setup
    pools = {"t": heldout_pools(task, n_test=6, seed=0)}
    points = evaluation_points(["t"], [0, 3], 2)
    scorer = Scorer(model, encoder, max_test=4, batch_size=4)
    rows = evaluate_init(scorer, CurveLabel("lora", "seen", 3), snapshot_lora(model), AdaptSettings(2, 1e-2), pools,
                         points)  # fmt: skip
    # 0 shots: nothing depends on the seed, so it is scored once rather than repeated per seed
    assert [(r.n_shots, r.seed) for r in rows] == [(0, 0), (3, 0), (3, 1)]
    assert {(r.method, r.setting, r.train_seed) for r in rows} == {("lora", "seen", 3)}  # labelled as asked
    assert all(r.metric == "accuracy" and 0.0 <= r.value <= 1.0 and r.n_test == 4 for r in rows)
    assert all(r.test_loss > 0 for r in rows)
    scorer.test_loss = False
    without = evaluate_init(scorer, CurveLabel("lora", "seen", 3), snapshot_lora(model), AdaptSettings(2, 1e-2), pools,
                            points)  # fmt: skip
    assert all(math.isnan(r.test_loss) for r in without)
    assert [r.value for r in without] == [r.value for r in rows]


def test_match_rate_goes_through_the_evaluate_module():
    from metalora.evaluation.scoring import match_rate

    assert match_rate(["The Paris.", "12", "x"], ["paris", "12", "y"], "text") == pytest.approx(2 / 3)
    assert match_rate(["A", "b"], ["A", "B"], "option") == 0.5
    with pytest.raises(ValueError, match="mode"):
        match_rate(["a"], ["a"], "fuzzy")


def _examples(targets: list[str]) -> list[Example]:
    return [Example(f"t:{i}", f"input {i}", t) for i, t in enumerate(targets)]


def test_best_constant_answer_is_the_most_common_label_share():
    labels = Task("t", "Label it.", "accuracy", [], options=["neg", "pos", "neutral"])
    assert best_constant_answer(labels, _examples(["pos", "neg", "pos", "pos"])) == ("accuracy", 0.75)
    # An option no test item has still counts as a candidate: it scores 0, never more than the others.
    assert best_constant_answer(labels, _examples(["neg", "pos"])) == ("accuracy", 0.5)
    # Free text is judged by the same normalised exact match as generations: "The Cat." matches "cat".
    text = Task("t", "Name it.", "exact_match", [])
    assert best_constant_answer(text, _examples(["The Cat.", "cat", "dog", "bird", "cat"])) == ("exact_match", 0.6)
    assert best_constant_answer(text, []) == ("exact_match", 0.0)


def test_constant_answer_rows_stand_at_every_shot_count_on_the_scored_items_only():
    task = Task("t", "Label it.", "accuracy", _examples(["a"] * 6 + ["b"] * 10), options=["a", "b"])
    pools = heldout_pools(task, n_test=8, seed=0)
    rows = constant_answer_rows({"t": pools}, [0, 4, 16], max_test=5)
    scored = [e.target for e in pools.test[:5]]
    expected = max(scored.count("a"), scored.count("b")) / 5
    assert [(r.method, r.n_shots, r.seed, r.n_test) for r in rows] == [("constant", n, 0, 5) for n in (0, 4, 16)]
    assert all(r.value == expected and r.metric == "accuracy" and math.isnan(r.test_loss) for r in rows)


def test_finite_weights_whose_forward_pass_overflows_are_flagged_not_scored(setup):
    model, _, encoder, task = setup
    pools = {"t": heldout_pools(task, n_test=6, seed=0)}
    # Finite, but large enough that the activations overflow to inf and the logits to NaN.
    huge = {k: torch.full_like(v, 3e38) for k, v in snapshot_lora(model).items()}
    scorer = Scorer(model, encoder, max_test=4, batch_size=4)
    rows = evaluate_init(scorer, CurveLabel("lora"), huge, AdaptSettings(0, 1e-2), pools, [("t", 0, 0)])
    assert all(torch.isfinite(v).all() for v in huge.values())
    assert [(r.finite, math.isnan(r.value), math.isnan(r.test_loss)) for r in rows] == [(False, True, True)]
