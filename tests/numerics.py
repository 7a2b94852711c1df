"""What two float32 computations of the same quantity may differ by, when they only sum in another order.

Another processor's kernels (vector width: ATEN_CPU_CAPABILITY), another thread count, micro-batches, a batched
kernel or a packed row add the same terms in another order. Each such sum rounds differently by a few ulps of its
largest terms, and those differences travel through the network's layers; they scale with the magnitude of the
tensor's large elements, not with the element compared. A small element next to large ones can therefore differ
by a large share of itself (one element of 1e-4 beside elements of 1e-2), while its difference stays a tiny share
of the tensor's scale. So each element is held to a share of the reference tensor's largest magnitude, never to a
share of itself.
"""

import torch

# Over every comparison of the numerical tests under three CPU capabilities and one and two threads, the largest
# first-order difference was below 1e-5 of its tensor's scale (docs/performance.md, "Numerical tolerances"): the
# bound keeps a margin of 10x or more and stays far below a real error (a missing task, a skipped micro-batch or
# query batch moves a gradient by a percent of its scale or more).
SCALE_SHARE = 1e-4
# Second order differentiates through the inner loop's Adam steps, whose division by the root of the second moment
# amplifies a rounding difference of a small gradient element: up to 2.3e-5 of the scale was measured there.
SECOND_ORDER_SHARE = 5e-4


def assert_close_at_scale(got: torch.Tensor, want: torch.Tensor, share: float = SCALE_SHARE) -> None:
    """Assert every element of `got` is within `share` of `want`'s largest magnitude (same shape and dtype); an
    all-zero reference must be matched exactly."""
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(
        got, want, rtol=0.0, atol=share * scale,
        msg=lambda message: f"{message}\n(bound: {share:g} x the reference's largest magnitude {scale:.3e})",
    )  # fmt: skip

