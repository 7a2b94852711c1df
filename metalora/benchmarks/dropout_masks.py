"""Time one LoRA-dropout call, forward and backward, with torch's CPU masks and with numpy's.

    python -m metalora.benchmarks.dropout_masks [--p 0.05] [--hidden 576] [--rows 4] [--tokens 24,48,96]

The inputs are [rows, tokens, hidden], the shape a LoRA layer of the embedded model (hidden 576) sees
for an inner-loop batch of the demo settings. Prints a Markdown table of median microseconds per call
(torch.utils.benchmark) and the ratio.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils.benchmark import Timer

from metalora.machine import describe_machine, machine_line
from metalora.speed.dropout_masks import NumpyMaskDropout


def time_call(dropout: torch.nn.Module, x: torch.Tensor) -> float:
    """Median seconds of one forward and backward pass through `dropout` at input `x`."""
    timer = Timer(
        "dropout(x).sum().backward()", globals={"dropout": dropout, "x": x}, num_threads=torch.get_num_threads()
    )
    return timer.blocked_autorange(min_run_time=1.0).median


def main(argv: list[str] | None = None) -> int:
    """Print the table; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, default=0.05, help="drop probability")
    parser.add_argument("--hidden", type=int, default=576, help="features per token")
    parser.add_argument("--rows", type=int, default=4, help="rows per batch")
    parser.add_argument("--tokens", default="24,48,96", help="comma-separated token widths")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"machine: {machine_line(describe_machine())}\np = {args.p}\n")
    print("| input | torch nn.Dropout µs | numpy masks µs | speed-up |\n|---|---|---|---|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(args.rows, tokens, args.hidden, requires_grad=True)
        reference = time_call(torch.nn.Dropout(args.p), x)
        numpy_masks = time_call(NumpyMaskDropout(args.p), x)
        shape = f"{args.rows}×{tokens}×{args.hidden}"
        print(f"| {shape} | {reference * 1e6:.0f} | {numpy_masks * 1e6:.0f} | {reference / numpy_masks:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
