"""The method: the inner loop (`adapt`), the meta-gradients of MeTA-LoRA (first and second order), Reptile, FOMAML
and the multi-task baseline (`meta.py`, which returns gradients and statistics and never steps an optimizer), the
task-batched inner loop (`batched.py`) and the loss on target tokens (`loss.py`).

Nothing here loads data: a batch is the dict of tensors `batch.py` describes, and episodes and their batches come in
through the protocols of `batch.py` (`EpisodeLike`, `BatchMaker`).
"""
