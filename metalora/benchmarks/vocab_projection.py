"""Time the vocabulary projection with nn.Linear's layout and the weight-first one, forward and backward.

    python -m metalora.benchmarks.vocab_projection [--hidden 576] [--vocab 49152] [--rows 16,20,48,116]

A random projection of the embedded model's shape (hidden 576, vocabulary 49152) applied to
[rows, hidden] hidden states: 16-48 rows are what the kit projects per batch (the target positions)
or per decoding step, 116 is a whole inner-loop batch (what full-sequence logits would project).
Prints a Markdown table of median milliseconds (torch.utils.benchmark) for the forward pass alone
and for forward, cross-entropy and backward to the hidden states, and the largest difference
between the two layouts' logits.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from metalora.machine import describe_machine, machine_line
from metalora.speed.weight_first_logits import WeightFirstProjection

FORWARD = "projection(hidden)"
FORWARD_BACKWARD = "F.cross_entropy(projection(hidden), targets).backward()"


def time_statement(statement: str, projection: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """Median seconds of `statement` (FORWARD or FORWARD_BACKWARD) on these inputs."""
    names = {"projection": projection, "hidden": hidden, "targets": targets, "F": F}
    timer = Timer(statement, globals=names, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=1.0).median


def main(argv: list[str] | None = None) -> int:
    """Print the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576, help="hidden size")
    parser.add_argument("--vocab", type=int, default=49152, help="vocabulary size")
    parser.add_argument("--rows", default="16,20,48,116", help="comma-separated numbers of projected rows")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    linear = torch.nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    weight_first = WeightFirstProjection.from_linear(linear)
    print(f"machine: {machine_line(describe_machine())}\nprojection {args.hidden} -> {args.vocab}, fp32\n")
    print("| rows | forward: nn.Linear ms | weight-first ms | speed-up | with loss and backward: nn.Linear ms "
          "| weight-first ms | speed-up | max logit difference |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for rows in (int(r) for r in args.rows.split(",")):
        hidden = torch.randn(rows, args.hidden, requires_grad=True)
        targets = torch.randint(0, args.vocab, (rows,))
        cells = []
        for statement in (FORWARD, FORWARD_BACKWARD):
            reference = time_statement(statement, linear, hidden, targets)
            faster = time_statement(statement, weight_first, hidden, targets)
            cells.append(f"{reference * 1e3:.1f} | {faster * 1e3:.1f} | {reference / faster:.2f}x")
        with torch.no_grad():
            difference = (linear(hidden) - weight_first(hidden)).abs().max().item()
        print(f"| {rows} | {cells[0]} | {cells[1]} | {difference:.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
