"""The method: the inner loop (`adapt`), the meta-gradients of MeTA-LoRA (first and second order), FOMAML, Reptile
and the multi-task baseline (`meta.py`: one small function per algorithm in its `ALGORITHMS` table, the loop over
tasks once; it returns gradients and statistics and never steps an optimizer), the same for first-order MeTA-LoRA
with every task adapted at once (`batched.py`), the loss on target tokens (`loss.py`) and what each task reports
(`task_stats.py`).

Nothing here loads or collates data: the method takes `EpisodeBatches` (`batch.py`), batches the data side made.
"""
