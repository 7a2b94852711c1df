"""The rate of the matrix multiplies inside a profiled step, by what they multiply.

A step's useful FLOP rate is bounded by how fast its own matmuls run, which at the small shapes of a
meta-learning step (a few rows of a few dozen tokens) is below the square-matrix peak the benchmark
measures. Splitting the profiled matmuls into the frozen base weights, the LoRA factors (one dimension
is the rank) and the vocabulary projection (one dimension is the vocabulary) shows that bound per kind.
"""

from __future__ import annotations

from collections.abc import Sequence

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
KINDS = ("base weights", "LoRA", "vocabulary projection")
Shapes = Sequence[Sequence[int]]


def operands(name: str, shapes: Shapes) -> tuple[Sequence[int], Sequence[int]] | None:
    """The two multiplied operands' shapes of a matmul call.

    Args:
        name: the operator, one of MATMUL_OPS.
        shapes: its input shapes as the profiler records them: addmm and baddbmm lead with the addend, scalars
            (alpha, beta) and an `out=` tensor may follow; calls traced while compiling carry empty shapes.

    Returns:
        (left, right) shapes, or None where the profiler did not record them.
    """
    if name not in MATMUL_OPS:
        raise ValueError(f"not a matmul operator: {name}")
    first = 1 if name in ("aten::addmm", "aten::baddbmm") else 0
    pair = shapes[first : first + 2]
    if len(pair) < 2 or any(len(shape) < 2 for shape in pair):
        return None
    return pair[0], pair[1]


def matmul_flops(left: Sequence[int], right: Sequence[int]) -> float:
    """Floating-point operations of one matmul of `left` [(B,) M, K] by `right` [(B,) K, N]: 2 * (B *) M * K * N."""
    batch = left[0] if len(left) == 3 else 1
    rows, inner = left[-2:]
    return 2.0 * batch * rows * inner * right[-1]


def matmul_kind(shapes: Shapes, lora_rank: int, vocab_size: int) -> str:
    """Which weights a matmul multiplies: the LoRA factors, the vocabulary projection, or base weights.

    A base-weight matmul over exactly r (or V) token rows would be filed under LoRA (or the vocabulary);
    at a few such calls per step that moves little.

    Args:
        shapes: the two operands' shapes.
        lora_rank: r of the LoRA factors (their matmuls have a dimension of exactly r).
        vocab_size: the vocabulary (the output head's matmuls have a dimension of exactly that size).

    Returns:
        One of KINDS.
    """
    dims = {d for shape in shapes for d in shape[-2:]}
    if vocab_size in dims:
        return "vocabulary projection"
    if lora_rank in dims:
        return "LoRA"
    return "base weights"


def matmul_rates(
    events: list[tuple[str, Shapes, int, float]], total_time: float, lora_rank: int, vocab_size: int
) -> dict[str, dict[str, float]]:
    """Time share and FLOP rate of the step's matmuls, by kind.

    Args:
        events: (operator, input shapes, calls, time in µs) of every profiled operator grouped by input
            shapes; non-matmuls are skipped.
        total_time: the step's total operator time in µs (the shares' denominator).

    Returns:
        {kind: {"time_share", "flops", "flops_per_s"}} for each kind in KINDS that occurred. Matmuls whose
        operand shapes were not recorded (traced while compiling) are left out: they cannot be rated.
    """
    totals: dict[str, list[float]] = {}
    for name, shapes, calls, micros in events:
        pair = operands(name, shapes) if name in MATMUL_OPS else None
        if pair is not None:
            acc = totals.setdefault(matmul_kind(pair, lora_rank, vocab_size), [0.0, 0.0])
            acc[0] += micros
            acc[1] += calls * matmul_flops(*pair)
    rates = {}
    for kind in KINDS:  # in a fixed order, whatever order the profile listed them in
        micros, flops = totals.get(kind, (0.0, 0.0))
        if micros > 0:
            rates[kind] = {"time_share": micros / total_time, "flops": flops, "flops_per_s": flops / (micros * 1e-6)}
    return rates
