"""Episodes -> adapt -> meta-gradients -> training step on tiny-random: what the method's correctness rests on."""

import contextlib

import pytest
import torch
from accelerate import Accelerator
from numerics import SCALE_SHARE, SECOND_ORDER_SHARE, assert_close_at_scale
from smoke import SMOKE
from torch.utils._python_dispatch import TorchDispatchMode

from metalora.config import load_config
from metalora.data.collation import Encoder
from metalora.data.episode_batches import episode_batches
from metalora.data.episodes import EpisodeSampler
from metalora.data.tasks import TaskError
from metalora.method.adapt import adapt, inner_update
from metalora.method.batched import task_batched_gradients, tasks_line_up
from metalora.method.loss import batch_loss
from metalora.method.meta import adapt_task, meta_gradients, seeded
from metalora.speed.compiled_layers import decoder_layers
from metalora.training.parts import build_parts
from metalora.training.step import StepResult, episode_gradients, training_step


def parts_for(*overrides: str):
    cfg = load_config(SMOKE, ["lora.dropout=0.0", *overrides])
    return build_parts(cfg)


def first_episode(parts, step=0):
    return parts.sampler.sample(step)[:1]


def tasks_of(parts):
    return parts.tasks


def support_batches(parts, episode):
    task = parts.splits.train[episode.task].task
    return task, parts.encoder.batches(task, episode.support, parts.cfg.meta.inner_batch_size)


def snapshot(params):
    return {k: v.detach().clone() for k, v in params.items()}


def nudge_lora_b(parts):
    # B = 0 makes the gradient wrt A zero; a non-zero B exercises every LoRA weight.
    with torch.no_grad():
        for name, p in parts.shared.items():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)


def test_adapt_with_zero_steps_returns_the_input_weights():
    parts = parts_for()
    episode = first_episode(parts)[0]
    _, batches = support_batches(parts, episode)
    adapted, losses = adapt(parts.model, parts.shared, batches, steps=0, lr=0.1)
    assert losses == []
    assert adapted is not parts.shared
    for name, value in parts.shared.items():
        assert torch.equal(adapted[name], value)


def test_support_loss_falls_and_the_module_is_untouched():
    parts = parts_for()
    episode = first_episode(parts)[0]
    _, batches = support_batches(parts, episode)
    before = snapshot(dict(parts.model.named_parameters()))
    _, losses = adapt(parts.model, parts.shared, batches[:1], steps=8, lr=1e-2, optimizer="adam")
    assert losses[-1] < losses[0] - 0.1
    for name, value in parts.model.named_parameters():
        assert torch.equal(value, before[name]), f"adapt wrote into the module: {name}"


@pytest.mark.numerics
def test_functional_adam_matches_torch_adam():
    parts = parts_for()
    nudge_lora_b(parts)
    episode = first_episode(parts)[0]
    _, batches = support_batches(parts, episode)
    adapted, _ = adapt(parts.model, parts.shared, batches, steps=3, lr=1e-3, optimizer="adam")
    reference = {k: v.detach().clone().requires_grad_(True) for k, v in parts.shared.items()}
    optimizer = torch.optim.Adam(reference.values(), lr=1e-3)
    for step in range(3):
        optimizer.zero_grad()
        batch_loss(parts.model, reference, batches[step % len(batches)]).backward()
        optimizer.step()
    for name in reference:
        assert_close_at_scale(adapted[name], reference[name])


class OperatorCalls(TorchDispatchMode):
    """Counts the operator calls made while it is active (calls inside an operator not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_inner_update_makes_as_many_operator_calls_for_thirty_tensors_as_for_three(optimizer):
    calls = {}
    for count in (3, 30):
        values, first, second = ([torch.randn(4, 2) for _ in range(count)] for _ in range(3))
        with OperatorCalls() as counter:
            values, moments = inner_update(values, first, None, 1, 1e-3, optimizer, False)
            inner_update(values, second, moments, 2, 1e-3, optimizer, False)
        calls[count] = counter.calls
    assert calls[3] == calls[30] > 0


@pytest.mark.numerics
def test_inner_sgd_matches_torch_sgd():
    values = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    grads = [torch.randn(5, 3), torch.randn(7)]
    updated, moments = inner_update(values, grads, None, 1, 0.1, "sgd", False)
    optimizer = torch.optim.SGD(values, lr=0.1)
    for value, grad in zip(values, grads, strict=True):
        value.grad = grad
    optimizer.step()
    assert moments is None
    for got, want in zip(updated, values, strict=True):
        assert_close_at_scale(got, want)


def test_smooth_inner_adam_keeps_a_finite_derivative_where_a_gradient_is_zero():
    value = torch.tensor([1.0, 2.0], requires_grad=True)
    grad = value * torch.tensor([0.0, 1.0])  # the first element's gradient is exactly zero
    (updated,), _ = inner_update([value], [grad], None, 1, 0.1, "adam", smooth=True)
    (derivative,) = torch.autograd.grad(updated.sum(), value)
    assert torch.isfinite(derivative).all()
    assert updated[0].item() == 1.0


@pytest.mark.numerics
def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_weights():
    parts = parts_for()
    nudge_lora_b(parts)
    episodes = first_episode(parts)
    cfg = parts.cfg.meta
    grads, _ = episode_gradients(parts, episodes, total_tasks=1)
    task, support = support_batches(parts, episodes[0])
    adapted, _ = adapt(parts.model, parts.shared, support, cfg.inner_steps, cfg.inner_lr, cfg.inner_optimizer)
    query = parts.encoder.collate([parts.encoder.encode(task, e) for e in episodes[0].query])
    expected = torch.autograd.grad(batch_loss(parts.model, adapted, query), list(adapted.values()))
    for got, want in zip(grads, expected, strict=True):
        assert_close_at_scale(got, want)


@pytest.mark.numerics
def test_second_order_matches_an_unrolled_reference_and_differs_from_first_order():
    parts = parts_for("meta.first_order=false", "meta.inner_optimizer=sgd", "meta.inner_lr=0.5")
    nudge_lora_b(parts)
    episodes = first_episode(parts)
    cfg = parts.cfg.meta
    tasks = tasks_of(parts)
    second, _ = episode_gradients(parts, episodes, total_tasks=1)

    task, support = support_batches(parts, episodes[0])
    weights = dict(parts.shared)
    for step in range(cfg.inner_steps):
        loss = batch_loss(parts.model, weights, support[step % len(support)])
        step_grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
        weights = {k: v - cfg.inner_lr * g for (k, v), g in zip(weights.items(), step_grads, strict=True)}
    query = parts.encoder.collate([parts.encoder.encode(task, e) for e in episodes[0].query])
    expected = torch.autograd.grad(batch_loss(parts.model, weights, query), list(parts.shared.values()))
    for got, want in zip(second, expected, strict=True):
        assert_close_at_scale(got, want, SECOND_ORDER_SHARE)

    first_cfg = type(cfg)(**{**cfg.__dict__, "first_order": True})
    batches = episode_batches(episodes, tasks, parts.encoder, first_cfg, parts.cfg.speed)
    first, _ = meta_gradients(parts.model, parts.shared, batches, first_cfg, 1)
    difference = max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))
    assert difference > 1e-6


def test_one_task_adapted_under_its_seed_draws_the_inner_losses_the_step_computes():
    # With dropout on, the notebook's section 2 (adapt_task under seeded) shows the curve meta_gradients computes.
    parts = parts_for("lora.dropout=0.1")
    nudge_lora_b(parts)
    batches = episode_batches(parts.sampler.sample(0), parts.tasks, parts.encoder, parts.cfg.meta, parts.cfg.speed)
    _, stats = meta_gradients(parts.model, parts.shared, batches, parts.cfg.meta, 2)
    with seeded(batches[0].seed):
        _, losses = adapt_task(parts.model, parts.shared, batches[0], parts.cfg.meta)
    assert len(losses) == parts.cfg.meta.inner_steps
    assert (losses[0], losses[-1]) == (stats[0].first_inner_loss, stats[0].last_inner_loss)
    _, unseeded = adapt_task(parts.model, parts.shared, batches[0], parts.cfg.meta)
    assert unseeded[-1] != stats[0].last_inner_loss  # another dropout draw: the seed is what makes them equal


def run_steps(parts, steps):
    accelerator = Accelerator(cpu=True)
    for step in range(steps):
        training_step(parts, step, accelerator)


def test_metalora_moves_only_lora_weights():
    parts = parts_for()
    base = {k: v.detach().clone() for k, v in parts.model.named_parameters() if "lora_" not in k}
    lora = snapshot(parts.shared)
    run_steps(parts, 2)
    for name, value in parts.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(value, base[name]), f"base weight changed: {name}"
    assert any(not torch.equal(lora[k], v) for k, v in parts.shared.items())


def test_fomaml_changes_the_base_weights():
    parts = parts_for("meta.algorithm=fomaml")
    assert not any("lora_" in name for name in parts.shared)
    before = snapshot(parts.shared)
    run_steps(parts, 1)
    changed = [k for k, v in parts.shared.items() if not torch.equal(before[k], v)]
    assert len(changed) > len(before) // 2


@pytest.mark.numerics
def test_reptile_moves_shared_weights_by_its_step_size_times_mean_displacement():
    parts = parts_for("meta.algorithm=reptile", "meta.reptile_step_size=0.5")
    nudge_lora_b(parts)
    before = snapshot(parts.shared)
    episodes = parts.sampler.sample(0)
    cfg = parts.cfg.meta
    displacement = {k: torch.zeros_like(v) for k, v in before.items()}
    for episode in episodes:
        _, support = support_batches(parts, episode)
        adapted, _ = adapt(parts.model, before, support, cfg.inner_steps, cfg.inner_lr, cfg.inner_optimizer)
        for k in displacement:
            displacement[k] += (adapted[k].detach() - before[k]) / len(episodes)
    run_steps(parts, 1)
    for k, v in parts.shared.items():
        assert_close_at_scale(v.detach(), before[k] + 0.5 * displacement[k])


def test_a_default_reptile_step_moves_the_shared_lora_about_as_far_as_a_metalora_step():
    moved = {}
    for algorithm in ("metalora", "reptile"):
        parts = parts_for(f"meta.algorithm={algorithm}")
        nudge_lora_b(parts)
        before = snapshot(parts.shared)
        run_steps(parts, 1)
        moved[algorithm] = torch.sqrt(sum(((v.detach() - before[k]) ** 2).sum() for k, v in parts.shared.items()))
    # With the outer step on meta.meta_lr (1e-3 here) Reptile moved about 1000x less than MeTA-LoRA.
    assert 0.1 < float(moved["reptile"] / moved["metalora"]) < 10


def test_meta_gradient_is_clipped_and_its_norm_reported():
    # Reptile's SGD outer step moves the weights by step size x gradient, so the clipped norm shows directly.
    moved, norms = {}, {}
    for bound in (0.0, 1e-4):
        parts = parts_for("meta.algorithm=reptile", f"meta.max_grad_norm={bound}")
        nudge_lora_b(parts)
        before = snapshot(parts.shared)
        result = training_step(parts, 0, Accelerator(cpu=True))
        norms[bound] = result.grad_norm
        moved[bound] = float(torch.sqrt(sum(((v.detach() - before[k]) ** 2).sum() for k, v in parts.shared.items())))
    assert norms[0.0] == pytest.approx(norms[1e-4], rel=1e-5) and norms[0.0] > 1e-3
    step = parts.cfg.meta.reptile_step_size
    assert moved[0.0] == pytest.approx(step * norms[0.0], rel=1e-3)
    assert moved[1e-4] == pytest.approx(step * 1e-4, rel=1e-3)


@pytest.mark.numerics
def test_target_only_loss_equals_the_full_logits_loss_and_ignores_padding():
    parts = parts_for()
    episode = first_episode(parts)[0]
    task = parts.splits.train[episode.task].task
    pairs = [parts.encoder.encode(task, e) for e in episode.support]
    batch = parts.encoder.collate(pairs)
    params = dict(parts.model.named_parameters())
    with torch.no_grad():
        fast = batch_loss(parts.model, params, batch)
        full = parts.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"], labels=batch["labels"],
        ).loss  # fmt: skip
        assert_close_at_scale(fast, full)
        # One row alone gives the same loss as inside a padded batch (per-token losses agree).
        alone = batch_loss(parts.model, params, parts.encoder.collate(pairs[:1]))
        n_tokens = [len(t) for _, t in pairs]
        per_row = [batch_loss(parts.model, params, parts.encoder.collate([p])) for p in pairs]
        weighted = sum(loss * n for loss, n in zip(per_row, n_tokens, strict=True)) / sum(n_tokens)
        assert_close_at_scale(alone, per_row[0])
        assert_close_at_scale(weighted, fast)


def test_episode_sampler_is_deterministic_disjoint_and_distinct():
    parts = parts_for()
    pools = parts.splits.train
    sampler = EpisodeSampler(pools, n_support=4, n_query=4, meta_batch_size=3, seed=7)
    again = EpisodeSampler(pools, n_support=4, n_query=4, meta_batch_size=3, seed=7)
    a, b = sampler.sample(5), again.sample(5)
    assert [(e.task, [x.id for x in e.support]) for e in a] == [(e.task, [x.id for x in e.support]) for e in b]
    assert len({e.task for e in a}) == 3
    for episode in a:
        assert not {x.id for x in episode.support} & {x.id for x in episode.query}
    split = sampler.sample(5, rank=0, world_size=2) + sampler.sample(5, rank=1, world_size=2)
    assert sorted(e.slot for e in split) == [0, 1, 2]
    assert {e.task for e in split} == {e.task for e in a}
    # Other steps draw other meta-batches: over 20 steps the tasks and a task's support examples vary.
    draws = [sampler.sample(step) for step in range(20)]
    assert len({tuple(e.task for e in episodes) for episodes in draws}) > 1
    supports = {tuple(x.id for x in e.support) for episodes in draws for e in episodes if e.task == a[0].task}
    assert len(supports) > 1


def test_episode_sampler_errors_name_the_problem():
    parts = parts_for()
    pools = parts.splits.train
    with pytest.raises(TaskError, match=r"meta_batch_size=999 is larger than the \d+ meta-training"):
        EpisodeSampler(pools, 4, 4, 999, 0)
    with pytest.raises(TaskError, match=r"task '.+' has \d+ support / \d+ query examples.*n_support=500"):
        EpisodeSampler(pools, 500, 4, 2, 0)


def test_prompt_template_and_loss_mask():
    parts = parts_for()
    episode = first_episode(parts)[0]
    task = parts.splits.train[episode.task].task
    example = episode.support[0]
    encoder = Encoder(parts.encoder.tokenizer, "Q: {input}\nA:", use_instruction=False)
    assert encoder.prompt(task, example) == f"Q: {example.input}\nA:"
    prompt, target = encoder.encode(task, example)
    batch = encoder.collate([(prompt, target), (prompt[:2], target)])
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled == target and target[-1] == encoder.tokenizer.eos_token_id
    assert int(batch["attention_mask"][1].sum()) == 2 + len(target)


def test_task_stats_count_every_real_token_forwarded():
    parts = parts_for()
    episode = first_episode(parts)[0]
    task, support = support_batches(parts, episode)
    query = parts.encoder.batches(task, episode.query, parts.cfg.meta.query_batch_size)
    _, stats = episode_gradients(parts, [episode], total_tasks=1)
    steps = parts.cfg.meta.inner_steps
    real = [int(b["attention_mask"].sum()) for b in support]
    expected = sum(real[i % len(real)] for i in range(steps)) + real[0]
    expected += sum(int(b["attention_mask"].sum()) for b in query)
    assert stats[0].tokens == expected > sum(int((b["labels"] != -100).sum()) for b in support + query)


def test_skipping_the_gap_check_keeps_the_gradient_and_drops_only_its_forward():
    from metalora.training.train import step_metrics

    results = {}
    for measure in (True, False):
        parts = parts_for(f"meta.measure_gap={str(measure).lower()}")
        episode = first_episode(parts)[0]
        grads, stats = episode_gradients(parts, [episode], total_tasks=1)
        result = StepResult(stats, None, 1e-3)
        results[measure] = (grads, stats[0], step_metrics(0, result, 1.0, torch.device("cpu")))
        _, support = support_batches(parts, episode)
    (grads_on, with_gap, logged_on), (grads_off, without, logged_off) = results[True], results[False]
    # Two builds built in one process start from the same LoRA init (seeded in build_parts).
    for a, b in zip(grads_on, grads_off, strict=True):
        assert torch.equal(a, b)
    assert with_gap.tokens - without.tokens == int(support[0]["attention_mask"].sum())
    assert without.adaptation_gap is None and with_gap.adaptation_gap is not None
    assert "adaptation_gap" in logged_on and "adaptation_gap" not in logged_off
    assert logged_on["stage2/meta_loss"] == logged_off["stage2/meta_loss"]


@pytest.mark.numerics
def test_grouping_query_rows_by_length_keeps_loss_and_gradient_and_cuts_padding():
    from metalora.method.meta import query_loss_and_grad

    parts = parts_for("meta.n_query=12", "meta.query_batch_size=3")
    nudge_lora_b(parts)
    episode = first_episode(parts)[0]
    task = parts.splits.train[episode.task].task
    wrt = list(parts.shared.values())
    results = {}
    for grouped in (False, True):
        batches = parts.encoder.batches(task, episode.query, 3, group_by_length=grouped)
        padding = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
        loss, grads = query_loss_and_grad(parts.model, parts.shared, wrt, batches, weight=1.0)
        results[grouped] = (loss, grads, padding)
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for a, b in zip(results[True][1], results[False][1], strict=True):
        assert_close_at_scale(a, b)
    assert results[True][2] < results[False][2]


@pytest.mark.numerics
@pytest.mark.parametrize("inner_optimizer", ["adam", "sgd"])
def test_task_batched_adaptation_matches_the_per_task_loop(inner_optimizer):
    # Two query batches per task and a meta-batch of three exercise the token-weighted query mean
    # and tasks padded to a common width.
    overrides = [f"meta.inner_optimizer={inner_optimizer}", "meta.meta_batch_size=3", "meta.query_batch_size=2"]
    results = {}
    for batched in (False, True):
        parts = parts_for(*overrides, f"speed.task_batched={str(batched).lower()}")
        nudge_lora_b(parts)
        episodes = parts.sampler.sample(0)
        batches = episode_batches(episodes, tasks_of(parts), parts.encoder, parts.cfg.meta, parts.cfg.speed)
        assert tasks_line_up(batches)
        gradients = task_batched_gradients if batched else meta_gradients
        results[batched] = gradients(parts.model, parts.shared, batches, parts.cfg.meta, 4)
    (loop_grads, loop_stats), (batched_grads, batched_stats) = results[False], results[True]
    assert any(float(g.abs().max()) > 0 for g in loop_grads)
    for a, b in zip(loop_grads, batched_grads, strict=True):
        assert_close_at_scale(b, a)
    for a, b in zip(loop_stats, batched_stats, strict=True):
        assert (a.task, a.tokens) == (b.task, b.tokens)
        for field in ("first_inner_loss", "last_inner_loss", "support_loss_after", "query_loss"):
            assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-5), field


def test_task_batched_falls_back_to_the_loop_when_batches_do_not_line_up():
    import dataclasses

    parts = parts_for("speed.task_batched=true", "meta.n_support=3", "meta.inner_batch_size=2")
    nudge_lora_b(parts)
    episodes = parts.sampler.sample(0)
    batches = episode_batches(episodes, parts.tasks, parts.encoder, parts.cfg.meta, parts.cfg.speed)
    assert tasks_line_up(batches)  # 2 + 1 rows in every task
    two_micro_batches = dataclasses.replace(batches[0], support=[batches[0].support[0] * 2])
    assert not tasks_line_up([two_micro_batches, batches[1]])
    # One support example fewer in the second task: 2 rows against 2 + 1, so the step takes the per-task loop.
    episodes[1].support = episodes[1].support[:2]
    uneven = episode_batches(episodes, parts.tasks, parts.encoder, parts.cfg.meta, parts.cfg.speed)
    assert not tasks_line_up(uneven)
    grads, stats = episode_gradients(parts, episodes, total_tasks=2)
    loop_grads, loop_stats = meta_gradients(parts.model, parts.shared, uneven, parts.cfg.meta, 2)
    assert all(torch.equal(a, b) for a, b in zip(grads, loop_grads, strict=True))
    assert stats == loop_stats
    # A step still runs (here batched) with dropout on, and the weights move.
    parts = parts_for("speed.task_batched=true", "lora.dropout=0.1")
    nudge_lora_b(parts)
    before = snapshot(parts.shared)
    run_steps(parts, 1)
    assert any(not torch.equal(before[k], v) for k, v in parts.shared.items())


def test_task_batched_is_refused_where_it_does_not_apply():
    from metalora.config import ConfigError

    for overrides in (["meta.first_order=false"], ["meta.algorithm=reptile"], ["meta.algorithm=fomaml"]):
        with pytest.raises(ConfigError, match="speed.task_batched"):
            load_config(SMOKE, ["speed.task_batched=true", *overrides])


class SecondProcessAccelerator:
    """Rank 0 of two processes; the other rank's flattened meta-gradient is given, and every reduce is recorded."""

    num_processes, process_index = 2, 0

    def __init__(self, other: torch.Tensor):
        self.other = other
        self.reduced: list[torch.Size] = []

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.reduced.append(tensor.shape)
        return tensor + self.other


@pytest.mark.numerics
def test_two_processes_reduce_the_meta_gradient_in_one_flattened_call_to_the_one_process_step():
    updated = []
    for world in (1, 2):
        parts = parts_for("lora.dropout=0.0")
        nudge_lora_b(parts)
        if world == 1:
            training_step(parts, 0, Accelerator(cpu=True))
        else:
            other, _ = episode_gradients(parts, parts.sampler.sample(0, 1, 2), parts.cfg.meta.meta_batch_size)
            accelerator = SecondProcessAccelerator(torch.cat([g.reshape(-1) for g in other]))
            training_step(parts, 0, accelerator)
            assert accelerator.reduced == [(sum(v.numel() for v in parts.shared.values()),)]
        updated.append(snapshot(parts.shared))
    for name, value in updated[0].items():
        assert_close_at_scale(value, updated[1][name])


@pytest.mark.numerics
@pytest.mark.parametrize("first_order", [True, False])
def test_micro_batches_give_the_meta_gradient_of_whole_batches(first_order):
    algorithm = ["meta.first_order=true"] if first_order else ["meta.first_order=false"]
    grads, losses, rows = {}, {}, {}
    for micro in (0, 1):
        parts = parts_for("meta.inner_steps=3", "meta.query_batch_size=4", f"meta.micro_batch_size={micro}",
                              *algorithm)  # fmt: skip
        nudge_lora_b(parts)
        # The rows of every forward pass through the first decoder layer: split batches show as passes of one row.
        rows[micro] = []
        first_layer = decoder_layers(parts.model)[0]
        hook = first_layer.register_forward_pre_hook(
            lambda _, args, kwargs, seen=rows[micro]: seen.append((args or [kwargs["hidden_states"]])[0].shape[0]),
            with_kwargs=True,
        )
        grads[micro], stats = episode_gradients(parts, parts.sampler.sample(0), total_tasks=2)
        hook.remove()
        losses[micro] = [v for s in stats for v in (s.first_inner_loss, s.last_inner_loss, s.support_loss_after,
                                                     s.query_loss)]  # fmt: skip
    for whole, micro in zip(grads[0], grads[1], strict=True):
        assert_close_at_scale(micro, whole, SCALE_SHARE if first_order else SECOND_ORDER_SHARE)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    # Really split: whole batches of several rows, one row per pass with micro-batches of one, the same rows in all.
    assert max(rows[0]) > 1 and set(rows[1]) == {1} and sum(rows[1]) == sum(rows[0])


def test_step_batches_split_each_inner_batch_into_micro_batches_in_order():
    parts = parts_for()
    episode = first_episode(parts)[0]
    task = parts.tasks[episode.task]
    steps = parts.encoder.step_batches(task, episode.support[:4], batch_size=3, micro_batch_size=2)
    assert [[len(b["input_ids"]) for b in step] for step in steps] == [[2, 1], [1]]
    whole = parts.encoder.step_batches(task, episode.support[:4], batch_size=3)
    assert [[len(b["input_ids"]) for b in step] for step in whole] == [[3], [1]]
    first = parts.encoder.encode(task, episode.support[0])
    assert steps[0][0]["input_ids"][0, -len(first[0]) - len(first[1]) :].tolist() == first[0] + first[1]


def test_a_micro_batch_size_the_task_batched_path_cannot_honour_is_refused():
    from metalora.config import ConfigError

    with pytest.raises(ConfigError, match="meta.micro_batch_size below meta.inner_batch_size"):
        load_config(SMOKE, ["speed.task_batched=true", "meta.micro_batch_size=1"])
