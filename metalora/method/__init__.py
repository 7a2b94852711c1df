"""The method: the inner loop (adapt), the meta-step of MeTA-LoRA / FOMAML / Reptile, and their loss.

Nothing here loads data: a batch is the dict of tensors described in `batch.py`, and episodes come in
through the small protocols of `meta.py`.
"""
