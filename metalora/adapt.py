"""The inner loop: K optimizer steps over a parameter dict, as a pure function.

Nothing is copied from or written into the model: every forward pass goes through
`torch.func.functional_call` with the current dict, and each step returns new tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from metalora.loss import batch_loss

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Params, dict[str, torch.Tensor]], torch.Tensor]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def adapt(
    model: torch.nn.Module,
    params: Params,
    batches: Sequence[dict[str, torch.Tensor]],
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
        batches: collated batches; step i uses batches[i % len(batches)].
        steps: number of inner steps (0 returns the input weights).
        lr: inner learning rate.
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
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    # Kept on the device and read once at the end: a read per step would wait for the device each step.
    losses: list[torch.Tensor] = []
    for step in range(steps):
        loss = loss_fn(model, current, batches[step % len(batches)])
        losses.append(loss.detach())
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=not first_order)
        updated = {}
        for (name, value), grad in zip(current.items(), grads, strict=True):
            if optimizer == "sgd":
                updated[name] = value - lr * grad
            else:
                updated[name], moments[name] = adam_update(
                    value, grad, moments.get(name), step + 1, lr, smooth=not first_order
                )
        current = _fresh_leaves(updated) if first_order else updated
    return current, torch.stack(losses).tolist() if losses else []


def _fresh_leaves(params: Params) -> Params:
    """Detach from any graph: first-order steps treat the incoming weights as constants."""
    return {k: v.detach().requires_grad_(True) for k, v in params.items()}


def adam_update(
    value: torch.Tensor,
    grad: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None,
    t: int,
    lr: float,
    smooth: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One functional Adam step (no weight decay); elementwise, so stacked per-task tensors work too.

    Args:
        value: the weights.
        grad: their gradient.
        state: the first and second moments from the previous step (None at the first step).
        t: the step number, from 1 (bias correction).
        lr: learning rate.
        smooth: use sqrt(v_hat + eps^2), differentiable where a gradient is zero (second order).

    Returns:
        (the new weights, the new moments).
    """
    beta1, beta2 = ADAM_BETAS
    m_prev, v_prev = state if state is not None else (torch.zeros_like(grad), torch.zeros_like(grad))
    m = beta1 * m_prev + (1 - beta1) * grad
    v = beta2 * v_prev + (1 - beta2) * grad * grad
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    if smooth:
        # Second order differentiates through this step: sqrt(v_hat + eps^2) keeps the derivative finite
        # where a gradient is exactly zero (LoRA A at B = 0), unlike sqrt(v_hat) + eps.
        denominator = torch.sqrt(v_hat + ADAM_EPS**2)
    else:
        denominator = v_hat.sqrt() + ADAM_EPS  # torch.optim.Adam's formula
    return value - lr * m_hat / denominator, (m, v)
