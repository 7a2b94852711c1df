"""The inner loop: K optimizer steps over a parameter dict, as a pure function.

Nothing is copied from or written into the model: every forward pass goes through
`torch.func.functional_call` with the current dict, and each step returns new tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from metalora.method.batch import Batch
from metalora.method.loss import batch_loss, count_target_tokens

Params = dict[str, torch.Tensor]
# Adam's first and second moments, one tensor per weight in the weights' order.
Moments = tuple[list[torch.Tensor], list[torch.Tensor]]
LossFn = Callable[[torch.nn.Module, Params, dict[str, torch.Tensor]], torch.Tensor]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def adapt(
    model: torch.nn.Module,
    params: Params,
    batches: Sequence[Batch | Sequence[Batch]],
    steps: int,
    lr: float,
    optimizer: str = "sgd",
    first_order: bool = True,
    loss_fn: LossFn = batch_loss,
) -> tuple[Params, list[float]]:
    """Adapt `params` with `steps` gradient steps on `batches` (cycled in order).

    Args:
        model: the model whose forward pass is used (its own tensors fill names not in `params`).
        params: starting weights by name; never modified.
        batches: collated batches, or per step the micro-batches of one batch (`Encoder.step_batches`); step i
            uses batches[i % len(batches)]. A step's micro-batches are forwarded one by one and their gradients
            summed with target-token weights (the loss of the whole batch, whatever `loss_fn` is per batch).
        steps: number of inner steps (0 returns the input weights).
        optimizer: "sgd" or "adam" (functional; its moments live only inside this call).
        first_order: True detaches every step (no graph back to `params`); False keeps the graph
            (`create_graph=True`) so a loss at the result can be differentiated back to `params`.
        loss_fn: loss of one batch under a parameter dict.

    Returns:
        (adapted weights as a new dict, the loss before each step).
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"unknown inner optimizer '{optimizer}' (expected sgd or adam)")
    current = _fresh_leaves(params) if first_order else dict(params)
    names = list(current)
    moments: Moments | None = None
    # Kept on the device and read once at the end: a read per step would wait for the device each step.
    losses: list[torch.Tensor] = []
    for step in range(steps):
        loss, grads = _loss_and_grads(model, current, batches[step % len(batches)], loss_fn, not first_order)
        losses.append(loss)
        # First order detaches every step, so the update itself needs no graph.
        with torch.set_grad_enabled(not first_order):
            values, moments = inner_update(
                list(current.values()), list(grads), moments, step + 1, lr, optimizer, smooth=not first_order
            )
        updated = dict(zip(names, values, strict=True))
        current = _fresh_leaves(updated) if first_order else updated
    return current, torch.stack(losses).tolist() if losses else []


def _loss_and_grads(
    model: torch.nn.Module, params: Params, batch: Batch | Sequence[Batch], loss_fn: LossFn, create_graph: bool
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The (detached) loss of one step's batch and its gradient, accumulated over micro-batches when it has them.

    Each micro-batch's graph is released after its backward pass (unless `create_graph` keeps it for a second
    order), so only one micro-batch's activations are alive at a time.
    """
    values = list(params.values())
    micro = [batch] if isinstance(batch, dict) else list(batch)
    if len(micro) == 1:
        loss = loss_fn(model, params, micro[0])
        return loss.detach(), list(torch.autograd.grad(loss, values, create_graph=create_graph))
    total_tokens = sum(count_target_tokens(b) for b in micro)
    total = torch.zeros((), device=values[0].device)
    grads: list[torch.Tensor] = []
    for part in micro:
        loss = loss_fn(model, params, part) * (count_target_tokens(part) / total_tokens)
        found = torch.autograd.grad(loss, values, create_graph=create_graph)
        # Out of place, so that a second-order graph runs through the sum.
        grads = list(found) if not grads else torch._foreach_add(grads, list(found))
        total = total + loss.detach()
    return total, grads


def _fresh_leaves(params: Params) -> Params:
    """Detach from any graph: first-order steps treat the incoming weights as constants."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def inner_update(
    values: list[torch.Tensor],
    grads: list[torch.Tensor],
    moments: Moments | None,
    t: int,
    lr: float,
    optimizer: str,
    smooth: bool,
) -> tuple[list[torch.Tensor], Moments | None]:
    """One functional SGD or Adam step over lists of tensors, returning new tensors.

    torch's multi-tensor `_foreach` operators (what torch.optim's foreach implementations use) make
    one operator call per arithmetic operation for the whole list instead of one per tensor: a LoRA
    model has hundreds of small factor tensors, so the per-tensor loop cost more in operator calls
    (and on a GPU, kernel launches) than in arithmetic. They apply the same operations in the same
    order as the per-tensor formulas, so the results are unchanged, and they are differentiable.

    Args:
        grads: the gradients of `values`, in the same order.
        moments: Adam's first and second moments from the previous step (None at the first step;
            unused by SGD).
        t: the step number, from 1 (Adam's bias correction).
        optimizer: "sgd" or "adam".
        smooth: Adam with sqrt(v_hat + eps^2), differentiable where a gradient is zero (second order).

    Returns:
        (the new weights, the new moments; None for SGD).
    """
    if optimizer == "sgd":
        return torch._foreach_sub(values, torch._foreach_mul(grads, lr)), None
    return adam_update(values, grads, moments, t, lr, smooth)


def adam_update(
    values: list[torch.Tensor],
    grads: list[torch.Tensor],
    state: Moments | None,
    t: int,
    lr: float,
    smooth: bool,
) -> tuple[list[torch.Tensor], Moments]:
    """One functional Adam step (no weight decay) over lists of tensors; elementwise, so stacked per-task
    tensors work too.

    Args:
        grads: the gradients of `values`, in the same order.
        state: the first and second moments from the previous step (None at the first step).
        t: the step number, from 1 (bias correction).
        smooth: use sqrt(v_hat + eps^2), differentiable where a gradient is zero (second order).

    Returns:
        (the new weights, the new moments).
    """
    beta1, beta2 = ADAM_BETAS
    # The per-tensor formulas m = beta1 m + (1 - beta1) g and v = beta2 v + (1 - beta2) g g, operation by operation.
    weighted_grads = torch._foreach_mul(grads, 1 - beta1)
    weighted_squares = torch._foreach_mul(torch._foreach_mul(grads, 1 - beta2), grads)
    if state is None:
        # Zero moments: adding beta * 0 would change no bit, so the first step skips it.
        m, v = weighted_grads, weighted_squares
    else:
        m_prev, v_prev = state
        m = torch._foreach_add(torch._foreach_mul(m_prev, beta1), weighted_grads)
        v = torch._foreach_add(torch._foreach_mul(v_prev, beta2), weighted_squares)
    m_hat = torch._foreach_div(m, 1 - beta1**t)
    v_hat = torch._foreach_div(v, 1 - beta2**t)
    if smooth:
        # Second order differentiates through this step: sqrt(v_hat + eps^2) keeps the derivative finite
        # where a gradient is exactly zero (LoRA A at B = 0), unlike sqrt(v_hat) + eps.
        denominator = torch._foreach_sqrt(torch._foreach_add(v_hat, ADAM_EPS**2))
    else:
        denominator = torch._foreach_add(torch._foreach_sqrt(v_hat), ADAM_EPS)  # torch.optim.Adam's formula
    steps = torch._foreach_div(torch._foreach_mul(m_hat, lr), denominator)
    return torch._foreach_sub(values, steps), (m, v)
