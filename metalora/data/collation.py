"""Tokenisation and collation of a task's examples into batches.

Batches are left-padded: every row ends with its target, so the positions that carry a loss line up
in the last columns and only those columns need logits (see `metalora/method/loss.py`). A batch can instead be
packed: its examples laid end to end in one row with no padding, each counting its positions from
0. A packed batch has no attention mask: from the restarting positions transformers builds the
block-diagonal causal mask for the model's attention implementation (its packed-sequence format),
so each example attends only to itself and the per-token losses are those of the padded batch.
Either way the batch carries `logit_positions`, the positions whose logits predict a target token,
computed here on the CPU so that the loss needs no device-to-host read.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from metalora.config import ConfigError, DataConfig
from metalora.data.tasks import Example, Task, TaskError
from metalora.method.batch import IGNORE_INDEX, window_positions


class Encoder:
    """Turns examples of a task into token ids (cached by example id) and collates batches.

    Args:
        template: prompt template with {instruction} and {input}.
        use_instruction: fill {instruction} with the task's instruction (else an empty string).
        max_prompt_tokens: prompts are cut from the left to this length (the end is kept).
        max_target_tokens: targets are cut to this length (before the end-of-sequence token).
        device: where collated batches are put (the model's device).
        chat_template: wrap each prompt as a user turn of the tokenizer's chat template (instruct models).

    Prompts carry the tokenizer's own special prefix (a BOS token for tokenizers that add one, such as
    Llama-3's and Gemma's; nothing for those that do not), kept when a long prompt is cut from the left;
    targets end with the end-of-sequence token, so that generation learns where to stop.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: str,
        use_instruction: bool = True,
        max_prompt_tokens: int = 256,
        max_target_tokens: int = 32,
        device: torch.device | str = "cpu",
        chat_template: bool = False,
    ):
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("bad value for 'data.chat_template': this model's tokenizer has no chat template")
        self.chat_template = chat_template
        self.tokenizer = tokenizer
        self.template = template
        self.use_instruction = use_instruction
        self.max_prompt_tokens = max_prompt_tokens
        self.max_target_tokens = max_target_tokens
        self.device = torch.device(device)
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    @classmethod
    def from_config(
        cls, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, device: torch.device | str = "cpu"
    ) -> Encoder:
        """The encoder the `data` group of a config describes."""
        return cls(tokenizer, cfg.prompt_template, cfg.use_instruction, cfg.max_prompt_tokens, cfg.max_target_tokens,
                   device=device, chat_template=cfg.chat_template)  # fmt: skip

    def prompt(self, task: Task, example: Example) -> str:
        """Return the prompt text of `example` (as a chat-template user turn when asked)."""
        instruction = task.instruction if self.use_instruction else ""
        text = self.template.format(instruction=instruction, input=example.input).lstrip()
        if self.chat_template:
            messages = [{"role": "user", "content": text}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    def prompt_ids(self, task: Task, example: Example) -> list[int]:
        """Return the prompt token ids, cut from the left to max_prompt_tokens but keeping a leading BOS."""
        # A chat template writes its own special tokens into the text.
        ids = self.tokenizer(self.prompt(task, example), add_special_tokens=not self.chat_template)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if len(ids) > self.max_prompt_tokens and bos is not None and ids[0] == bos:
            return [bos, *ids[1:][-(self.max_prompt_tokens - 1) :]]
        return ids[-self.max_prompt_tokens :]

    def target_ids(self, text: str) -> list[int]:
        """Return the token ids of a target or option: a leading space, the text, end-of-sequence."""
        ids = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"][: self.max_target_tokens]
        return ids + [self.tokenizer.eos_token_id]

    def encode(self, task: Task, example: Example) -> tuple[list[int], list[int]]:
        """Return (prompt ids, target ids) of an example, cached by its id."""
        key = f"{task.name}\x00{example.id}"
        if key not in self._cache:
            prompt = self.prompt_ids(task, example)
            if not prompt:
                raise TaskError(
                    f"task '{task.name}', example {example.id}: the prompt is empty (data.prompt_template with an "
                    "empty input and no instruction): no token would predict the target's first token"
                )
            self._cache[key] = (prompt, self.target_ids(example.target))
        return self._cache[key]

    def collate(self, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Left-pad (prompt, target) pairs into a batch with loss on target tokens only.

        Args:
            pairs: (prompt ids, target ids) per row.

        Returns:
            input_ids, attention_mask, position_ids (count real tokens only, so padding does not shift
            positions), labels (-100 outside targets), logit_positions (the window's columns) and the
            CPU token counts target_tokens and input_tokens.
        """
        rows = [p + t for p, t in pairs]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ((_, target), row) in enumerate(zip(pairs, rows, strict=True)):
            input_ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
            labels[i, width - len(target) :] = torch.tensor(target)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        window = max(len(t) for _, t in pairs)
        batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "labels": labels,
                 "logit_positions": window_positions(width, window)}  # fmt: skip
        return self._to_device(batch)

    def pack(self, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Lay (prompt, target) pairs end to end in one row, without padding.

        Args:
            pairs: (prompt ids, target ids) per example; every prompt must be non-empty.

        Returns:
            input_ids, position_ids (from 0 within each example) and labels (-100 outside targets),
            each [1, N] for N tokens in all, logit_positions, the positions whose logits predict a
            target token, and the CPU token counts target_tokens and input_tokens. No attention_mask:
            the model derives it from the positions.

        Raises:
            ValueError: an example has an empty prompt (its first target token would have no
                position to be predicted from, and its positions would not mark where it starts).
        """
        if any(not prompt for prompt, _ in pairs):
            raise ValueError("cannot pack an example with an empty prompt: its first target token has no predictor")
        lengths = torch.tensor([len(p) + len(t) for p, t in pairs])
        starts = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
        labels = torch.tensor([token for p, t in pairs for token in [IGNORE_INDEX] * len(p) + t])
        batch = {
            "input_ids": torch.tensor([token for p, t in pairs for token in p + t])[None],
            "position_ids": positions[None],
            "labels": labels[None],
            "logit_positions": (labels != IGNORE_INDEX).nonzero().squeeze(-1) - 1,
        }
        return self._to_device(batch)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move a batch to the model's device, with its token counts computed and left on the CPU.

        `target_tokens` and `input_tokens` (0-dim, CPU) let the loss weighting and the statistics
        read the counts without waiting for the device (each read of a GPU tensor is a host sync).
        """
        mask = batch.get("attention_mask")
        counts = {
            "target_tokens": (batch["labels"] != IGNORE_INDEX).sum(),
            # A packed batch has no mask and no padding.
            "input_tokens": torch.tensor(batch["input_ids"].numel()) if mask is None else mask.sum(),
        }
        return {key: tensor.to(self.device) for key, tensor in batch.items()} | counts

    def batches(
        self,
        task: Task,
        examples: list[Example],
        batch_size: int,
        group_by_length: bool = False,
        pack_tokens: int = 0,
    ) -> list[dict[str, torch.Tensor]]:
        """Collate `examples` of `task` into batches of at most `batch_size` examples.

        Args:
            task: the task (its instruction goes into the prompt).
            examples: the examples, batched in order unless grouped.
            batch_size: examples per batch.
            group_by_length: sort by encoded length first, so rows of similar length share a batch
                and little padding is computed. Only for sets whose loss is a token-weighted mean
                over all batches (query sets, scoring), where the order does not change the result.
            pack_tokens: pack a batch into one row (`pack`) when its examples hold at most this many
                tokens in all; longer batches, and every batch when 0, are left-padded (`collate`).
                Attention over a packed row costs the square of its length, so the bound keeps it small.

        Returns:
            The batches.
        """
        encoded = [self.encode(task, e) for e in examples]
        if group_by_length:
            encoded = [encoded[i] for i in self.length_order(task, examples)]
        chunks = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
        return [
            self.pack(chunk) if sum(len(p) + len(t) for p, t in chunk) <= pack_tokens else self.collate(chunk)
            for chunk in chunks
        ]

    def length_order(self, task: Task, examples: list[Example]) -> list[int]:
        """The order `batches(..., group_by_length=True)` puts `examples` in: their indices by encoded length, ties
        in their own order (so a row of those batches can be traced back to its example)."""
        lengths = [sum(map(len, self.encode(task, e))) for e in examples]
        return sorted(range(len(examples)), key=lengths.__getitem__)

    def step_batches(
        self,
        task: Task,
        examples: list[Example],
        batch_size: int,
        micro_batch_size: int = 0,
        pack_tokens: int = 0,
    ) -> list[list[dict[str, torch.Tensor]]]:
        """`examples` in batches of `batch_size` (in order, one per inner step), each collated as micro-batches of
        at most `micro_batch_size` rows (0 = the whole batch in one pass).

        A step's micro-batches are forwarded one at a time and their gradients accumulated with target-token
        weights, which equals one pass over the whole batch: the memory of a long-sequence batch is bounded by
        the micro-batch, not by `batch_size`.
        """
        rows = micro_batch_size or batch_size
        return [
            self.batches(task, examples[i : i + batch_size], rows, pack_tokens=pack_tokens)
            for i in range(0, len(examples), batch_size)
        ]

