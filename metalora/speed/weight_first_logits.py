"""The vocabulary projection computed weight-first on CPU: logits = (W @ h^T)^T instead of h @ W^T.

The kit projects only a few rows onto the vocabulary per forward pass (the target positions of a
batch, or one position per row while decoding). For such a short, wide product torch's CPU matmul
is faster with the weight as the left operand, with the same logits (`python -m
metalora.benchmarks.vocab_projection` measures it; the figures are in docs/performance.md). Autograd derives the
backward pass from the same product, so nothing else changes. Other devices keep `nn.Linear`'s own forward.
"""

from __future__ import annotations

import torch


class WeightFirstProjection(torch.nn.Linear):
    """`torch.nn.Linear` whose CPU forward computes (W @ h^T)^T; the same parameters and state dict.

    Build it with `from_linear`, which keeps the linear layer's own weight and bias tensors, so a
    weight tied to the input embeddings stays tied.
    """

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> WeightFirstProjection:
        """Wrap `linear`'s parameters (not copies of them) in a weight-first projection.

        Returns:
            A module holding the very same weight (and bias) tensors.
        """
        # Built on the meta device: its own freshly drawn weights would be thrown away at once.
        projection = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        projection.weight = linear.weight
        projection.bias = linear.bias
        return projection

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.device.type != "cpu":
            return super().forward(hidden)
        rows = hidden.reshape(-1, self.in_features)
        logits = (self.weight @ rows.T).T
        if self.bias is not None:
            logits = logits + self.bias
        return logits.reshape(*hidden.shape[:-1], self.out_features)


def use_weight_first_projection(model: torch.nn.Module) -> bool:
    """Replace the model's output projection, when it is a plain `nn.Linear`, by `WeightFirstProjection`.

    Args:
        model: a transformers model (anything with get/set_output_embeddings).

    Returns:
        True when the projection was replaced; False when the model has none or it is not a plain
        `nn.Linear` (left as it is).
    """
    output = model.get_output_embeddings()
    if type(output) is not torch.nn.Linear:
        return False
    model.set_output_embeddings(WeightFirstProjection.from_linear(output))
    return True
