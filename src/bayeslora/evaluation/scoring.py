"""From examples to class scores: how a task is put to a model.

A :class:`Scorer` does two things: ``collate`` turns a list of examples into a batch of tensors, and
``class_logits`` runs the model on that batch and returns one score per class, shape ``(B, C)``, where
``C`` is the task's largest number of choices and missing choices score ``-inf``. The predictive
distribution of every method is ``softmax(class_logits)``, so training (cross-entropy on these scores)
and evaluation see exactly the same thing.

Three scorings:

* ``cloze`` (causal LMs): each choice's continuation is scored by its log-likelihood after its context,
  ``ℓ_c = Σ_t log p(y_t | context, y_<t)`` (``sum``) or that sum divided by the number of continuation
  tokens (``mean``, the default: it does not penalise long answers). A batch runs as one batched pass
  over its distinct contexts, whose key/value cache then serves one batched pass over all B·C
  continuations (see :class:`ClozeScorer`).
* ``letter`` (causal LMs, the BLoB protocol): the prompt lists the choices as ``A. ...`` and ends with
  ``Answer:``; the class scores are the next-token logits of `` A``, `` B``, ... at the last position.
* ``classification`` (sequence-classification heads): the head's logits.
* ``completion`` (instruction data, causal LMs): no classes; a prompt and its completion are rendered as the model
  sees them (plain, or through the tokenizer's chat template), the loss is the mean NLL of the completion's tokens
  (an end-of-sequence token closes a plain completion), the prompt is context only (:class:`CompletionScorer`; its
  evaluation: :mod:`bayeslora.evaluation.completion_metrics`).

Every batch carries ``sequence_example``: for each model input row, the index of the example it belongs
to. Bayesian adapters use it to give each example its own weight sample, shared by the example's
choices (otherwise the choices of one question would be scored by different models).
"""

from __future__ import annotations

import inspect
import string
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tasks import ClassificationExample, Example, InstructionExample, MultipleChoiceExample, Task
from ..tasks.base import default_cloze_context
from ..tuners.sampling import rows_of_examples

Scoring = Literal["cloze", "letter", "classification", "completion"]
ClozeNormalization = Literal["mean", "sum"]

Batch = dict[str, Tensor]


class Scorer(ABC):
    """Collates examples and turns model outputs into class logits ``(B, C)``.

    Every batch entry belongs to a row group, its first dimension: ``example`` (B rows) or a group of model
    input rows (``sequence``, ``prefix``). ``index_keys`` name the entries whose values index the rows of
    another group. Together they let :meth:`repeat` tile a batch for batched posterior sampling.
    """

    name: str
    row_groups: ClassVar[dict[str, str]] = {
        "input_ids": "sequence",
        "attention_mask": "sequence",
        "sequence_example": "sequence",
        "labels": "example",
        "choice_mask": "example",
    }
    index_keys: ClassVar[dict[str, str]] = {"sequence_example": "example"}

    def __init__(self, tokenizer, num_classes: int, max_length: int = 512) -> None:
        if max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {max_length}")
        self.tokenizer = tokenizer
        self.num_classes = num_classes
        self.max_length = max_length
        self._truncated = 0

    @abstractmethod
    def collate(self, examples: Sequence[Example]) -> Batch:
        """A batch of tensors (on CPU) for ``examples``; includes ``labels`` (B,) and ``choice_mask`` (B, C)."""

    @abstractmethod
    def class_logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """Class scores ``(B, C)`` of the batch under ``model``; ``-inf`` where ``choice_mask`` is False."""

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """``(loss, class logits)`` of a training batch: the cross-entropy of the class scores, averaged over the
        batch (other data, such as instruction rows, have their own)."""
        logits = self.class_logits(model, batch)  # (B, C)
        return F.cross_entropy(logits, batch["labels"]), logits

    def repeat(self, batch: Batch, n: int) -> Batch:
        """The batch tiled ``n`` times: copy ``k`` holds examples ``k·B .. k·B + B - 1``.

        ``class_logits`` of the result, viewed as ``(n, B, C)``, gives copy by copy the scores of the
        original batch; a Bayesian adapter draws a separate weight sample for each of the ``n·B`` examples.
        """
        sizes = {group: batch[key].shape[0] for key, group in self.row_groups.items() if key in batch}
        tiled: Batch = {}
        for key, value in batch.items():
            if key not in self.row_groups:
                tiled[key] = value
                continue
            copies = value.repeat(n, *([1] * (value.dim() - 1)))
            if key in self.index_keys:  # shift indices into the copy's own rows
                rows = sizes[self.index_keys[key]]
                copies = copies + torch.arange(n, device=value.device).repeat_interleave(value.shape[0]) * rows
            tiled[key] = copies
        return tiled

    def _note_truncation(self, count: int) -> None:
        if count and not self._truncated:
            warnings.warn(
                f"{count} sequence(s) longer than max_length={self.max_length} tokens were truncated "
                f"(the start of the prompt is cut); raise --max-length to keep them whole.",
                stacklevel=3,
            )
        self._truncated += count

    def _choice_mask(self, counts: Sequence[int]) -> Tensor:
        too_many = [c for c in counts if c > self.num_classes]
        if too_many:
            raise ValueError(
                f"an example has {max(too_many)} choices/classes but the scorer was built for {self.num_classes}"
            )
        return torch.arange(self.num_classes)[None, :] < torch.tensor(counts)[:, None]


def _transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/FSDP and PEFT wrappers."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    while hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def _accepts(model: nn.Module, argument: str) -> bool:
    """Whether the underlying transformers model's forward takes ``argument`` (DDP/FSDP and PEFT wrappers
    unwrapped)."""
    return argument in inspect.signature(_transformers_model(model).forward).parameters


@contextmanager
def head_on_targets(model: nn.Module, rows: Tensor, positions: Tensor, examples: Tensor) -> Iterator[bool]:
    """Within the block the LM head runs on the K positions ``(rows[k], positions[k])`` of its input only, a
    contiguous ``(K, 1, d)`` gather, so the model's logits are ``(K, 1, V)`` in that order; each gathered position
    is a row of the head's pass that belongs to example ``examples[k]`` (its posterior sample). Yields False, and
    changes nothing, for a model without an output-embedding layer.

    A cloze pass needs the log-probabilities of the continuation tokens only: running the head on every position
    from the first continuation on (``logits_to_keep``) costs, over a left-padded batch tiled N times, R·T'·V logits
    (with the Bayesian head's delta in float32, gigabytes for long MMLU choices) where K·V are needed."""
    head = _transformers_model(model).get_output_embeddings()
    if head is None:
        yield False
        return
    announced: list[AbstractContextManager[None]] = []

    def gather(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]  # (R, T, d)
        announced.append(rows_of_examples(examples))
        announced[-1].__enter__()
        return (hidden[rows, positions][:, None, :], *args[1:])  # (K, 1, d)

    def release(module: nn.Module, args: tuple, output: Tensor) -> None:
        announced.pop().__exit__(None, None, None)

    handles = (head.register_forward_pre_hook(gather), head.register_forward_hook(release))
    try:
        yield True
    finally:
        for handle in handles:
            handle.remove()


def kept_positions(model: nn.Module, start: int, length: int, device: torch.device) -> dict[str, Tensor]:
    """The forward argument that runs the LM head on positions ``start .. length - 1`` only, for models that
    take one (``logits_to_keep``), else nothing (the head then runs on every position).

    The positions are given as an index tensor rather than as a count: the LM head then receives a contiguous
    copy of those hidden states, ``(B, length - start, d)``. A count makes transformers hand it a strided
    slice of ``(B, T, d)``, and a linear layer on a strided input is far off the fast path of CPU matmuls
    (SmolLM2's LM head on 16 x 8 positions of 64: 7x slower in fp32, 120x in bf16)."""
    if not _accepts(model, "logits_to_keep"):
        return {}
    return {"logits_to_keep": torch.arange(start, length, device=device)}


def _pad(rows: list[list[int]], pad_id: int, side: Literal["left", "right"]) -> tuple[Tensor, Tensor]:
    """``(R, T)`` ids and attention mask, rows aligned right (left padding) or left (right padding)."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def _positions(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


class ClozeScorer(Scorer):
    """Score each choice by the (mean or summed) log-likelihood of its continuation after its context.

    One model row per example, packed: the example's distinct contexts, then all its continuations,
    ``[ctx | cont_1 | cont_2 | ... | cont_C]`` (WinoGrande: ``[ctx_1 | ctx_2 | cont_1 | cont_2]``). A
    custom attention mask lets each continuation see only its own context and its own earlier tokens, and
    its position ids continue from its context's length, so every choice is scored exactly as if it ran
    alone after its context, but the shared context is computed once and nothing is padded per choice:
    ~2.5-3x fewer tokens than one sequence per choice on ARC and OpenBookQA. The LM head runs only on the
    tail of the rows, where the predicting positions are.
    """

    name = "cloze"
    row_groups: ClassVar[dict[str, str]] = {
        "input_ids": "row",  # (B, T)
        "position_ids": "row",  # (B, T)
        "segment_mask": "row",  # (B, 1, T, T) True where attention is allowed
        "sequence_example": "row",  # (B,)
        "choice_example": "choice",  # (S,) example of each choice, S = Σ_b C_b
        "choice_index": "choice",  # (S,) which of its example's choices it is
        "choice_length": "choice",  # (S,) number of continuation tokens
        "target_row": "token",  # (K,) row of each continuation token, K = Σ_s len(cont_s)
        "target_position": "token",  # (K,) position whose logits predict the token
        "target_token": "token",  # (K,) the token id
        "target_choice": "token",  # (K,) choice it belongs to
        "labels": "example",
        "choice_mask": "example",
    }
    index_keys: ClassVar[dict[str, str]] = {
        "sequence_example": "example",
        "choice_example": "example",
        "target_row": "row",
        "target_choice": "choice",
    }

    def __init__(
        self,
        tokenizer,
        num_classes: int,
        max_length: int = 512,
        normalization: ClozeNormalization = "mean",
        chat_template: bool = False,
    ) -> None:
        super().__init__(tokenizer, num_classes, max_length)
        if normalization not in ("mean", "sum"):
            raise ValueError(f"cloze normalization must be 'mean' or 'sum', got '{normalization}'")
        if chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("--chat-template: this tokenizer has no chat template (an instruct model's has)")
        self.normalization = normalization
        self.chat_template = chat_template

    def chat_pair(self, example: MultipleChoiceExample, context: str, continuation: str) -> tuple[str, str]:
        """With the chat template, a choice is the assistant's reply to the question as a user turn: the context
        is the rendered chat up to the opened assistant turn (the question itself rather than the default
        ``Question: ...\nAnswer:`` prompt; a custom context as it is) and the continuation loses its leading
        space."""
        if not self.chat_template:
            return context, continuation
        user = example.question if context == default_cloze_context(example.question) else context
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        return rendered, continuation.lstrip()

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of ``context`` and of ``continuation`` as it follows the context.

        The whole string is encoded at once and the continuation is what follows the context's own
        encoding (robust for tokenizers that add a prefix space); if the context's encoding is not a
        prefix of the whole (a merge across the boundary), the continuation is encoded on its own.
        """
        head = self.tokenizer(context).input_ids
        if not head:
            raise ValueError(f"context {context!r} encodes to no tokens")
        whole = self.tokenizer(context + continuation).input_ids
        if whole[: len(head)] == head and len(whole) > len(head):
            return head, whole[len(head) :]
        tail = self.tokenizer(continuation, add_special_tokens=False).input_ids
        if not tail:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        return head, tail

    def _pack(self, example: MultipleChoiceExample) -> tuple[list[int], list[int], list[list[int]], list, bool]:
        """One example as a packed row.

        Returns token ids, position ids, the attention "parents" of each token (the positions in the row
        it may attend to are its own segment up to itself plus its parent context), the predicting
        positions and targets of each choice, and whether anything was truncated.
        """
        pairs = [
            self.encode_pair(*self.chat_pair(example, c, t))
            for c, t in zip(example.contexts, example.continuations, strict=True)
        ]
        heads: list[list[int]] = []
        head_of_choice: list[int] = []
        for head, _ in pairs:
            if head not in heads:
                heads.append(head)
            head_of_choice.append(heads.index(head))
        tails = [tail for _, tail in pairs]
        truncated = False
        budget = self.max_length - sum(len(t) for t in tails)
        if budget < len(heads):  # continuations alone overflow: shorten the longest ones
            truncated = True
            cap = max(1, (self.max_length // 2) // len(tails))
            tails = [t[:cap] for t in tails]
            budget = self.max_length - sum(len(t) for t in tails)
        if sum(len(h) for h in heads) > budget:  # keep the end of each context
            truncated = True
            room = max(1, budget // len(heads))
            heads = [h[-room:] for h in heads]
        ids: list[int] = []
        positions: list[int] = []
        segments: list[tuple[int, int, int | None]] = []  # (start, end, parent segment)
        for head in heads:
            segments.append((len(ids), len(ids) + len(head), None))
            ids += head
            positions += range(len(head))
        targets = []  # per choice: (predicting positions, target tokens)
        for choice, tail in enumerate(tails):
            parent = head_of_choice[choice]
            p_start, p_end, _ = segments[parent]
            start = len(ids)
            segments.append((start, start + len(tail), parent))
            ids += tail
            positions += range(p_end - p_start, p_end - p_start + len(tail))
            predictors = [p_end - 1, *list(range(start, start + len(tail) - 1))]
            targets.append((predictors, tail))
        return ids, positions, segments, targets, truncated

    def collate(self, examples: Sequence[Example]) -> Batch:
        packed = []
        for example in examples:
            if not isinstance(example, MultipleChoiceExample):
                raise TypeError("cloze scoring needs multiple-choice examples")
            packed.append(self._pack(example))
        self._note_truncation(sum(p[4] for p in packed))
        length = max(len(p[0]) for p in packed)
        num_rows = len(packed)
        input_ids = torch.full((num_rows, length), self.tokenizer.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((num_rows, length), dtype=torch.long)
        mask = torch.zeros((num_rows, 1, length, length), dtype=torch.bool)
        causal = torch.ones((length, length), dtype=torch.bool).tril()
        choice_example, choice_index, choice_length = [], [], []
        target_row, target_position, target_token, target_choice = [], [], [], []
        for row, (ids, positions, segments, targets, _) in enumerate(packed):
            pad = length - len(ids)  # left padding: every row ends at the last column
            input_ids[row, pad:] = torch.tensor(ids)
            position_ids[row, pad:] = torch.tensor(positions)
            for start, end, parent in segments:
                rows = slice(pad + start, pad + end)
                mask[row, 0, rows, rows] = causal[: end - start, : end - start]
                if parent is not None:
                    p_start, p_end, _ = segments[parent]
                    mask[row, 0, rows, pad + p_start : pad + p_end] = True
            for choice, (predictors, tail) in enumerate(targets):
                number = len(choice_example)
                choice_example.append(row)
                choice_index.append(choice)
                choice_length.append(len(tail))
                target_row += [row] * len(tail)
                target_position += [pad + p for p in predictors]
                target_token += tail
                target_choice += [number] * len(tail)
            # padding rows attend to themselves only, so that no softmax row is empty
            mask[row, 0, range(pad), range(pad)] = True
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "segment_mask": mask,
            "sequence_example": torch.arange(num_rows),
            "choice_example": torch.tensor(choice_example),
            "choice_index": torch.tensor(choice_index),
            "choice_length": torch.tensor(choice_length),
            "target_row": torch.tensor(target_row),
            "target_position": torch.tensor(target_position),
            "target_token": torch.tensor(target_token),
            "target_choice": torch.tensor(target_choice),
            "labels": torch.tensor([e.answer for e in examples]),
            "choice_mask": self._choice_mask([e.num_classes for e in examples]),
        }

    def choice_loglik(self, model: nn.Module, batch: Batch) -> Tensor:
        """Log-likelihood of each choice's continuation, ``(S,)``, normalised per :attr:`normalization`."""
        input_ids = batch["input_ids"]  # (B, T)
        length = input_ids.shape[1]
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        additive = torch.zeros(batch["segment_mask"].shape, dtype=dtype, device=input_ids.device)
        additive.masked_fill_(~batch["segment_mask"], torch.finfo(dtype).min)  # (B, 1, T, T)
        rows, positions = batch["target_row"], batch["target_position"]  # (K,) each
        inputs = {"input_ids": input_ids, "attention_mask": additive, "position_ids": batch["position_ids"]}
        with (
            rows_of_examples(batch["sequence_example"]),
            head_on_targets(model, rows, positions, batch["sequence_example"][rows]) as gathered,
        ):
            if gathered:
                picked = model(**inputs).logits[:, 0].float()  # (K, V)
            else:  # the head on every position from the first continuation on
                first_needed = int(positions.min())
                logits = model(**inputs, **kept_positions(model, first_needed, length, input_ids.device)).logits
                offset = logits.shape[1] - length  # column of position 0 in `logits`: (B, T - first_needed, V)
                picked = logits[rows, positions + offset].float()  # (K, V)
        token_ll = picked.gather(-1, batch["target_token"][:, None]).squeeze(-1) - picked.logsumexp(-1)  # (K,)
        total = torch.zeros(batch["choice_length"].shape[0], device=token_ll.device, dtype=token_ll.dtype)
        total = total.index_add(0, batch["target_choice"], token_ll)  # (S,)
        return total / batch["choice_length"] if self.normalization == "mean" else total

    def class_logits(self, model: nn.Module, batch: Batch) -> Tensor:
        scores = self.choice_loglik(model, batch)  # (S,)
        num_examples = batch["labels"].shape[0]
        logits = torch.full((num_examples, self.num_classes), float("-inf"), device=scores.device)
        logits[batch["choice_example"], batch["choice_index"]] = scores.to(logits.dtype)
        return logits  # (B, C)


class LetterScorer(Scorer):
    """The BLoB protocol: lettered choices, next-token logits of the answer letters at the last position."""

    name = "letter"

    def __init__(self, tokenizer, num_classes: int, max_length: int = 512) -> None:
        super().__init__(tokenizer, num_classes, max_length)
        if num_classes > len(string.ascii_uppercase):
            raise ValueError(f"letter scoring supports at most 26 choices, got {num_classes}")
        self.letters = string.ascii_uppercase[:num_classes]
        self.letter_ids = torch.tensor([self._single_token(" " + letter) for letter in self.letters])

    def _single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"letter scoring needs {text!r} to be one token, but this tokenizer splits it into {ids}; "
                f"use --scoring cloze."
            )
        return ids[0]

    def prompt(self, example: MultipleChoiceExample) -> str:
        """``"Question: q\\n A. c1\\n B. c2\\nAnswer:"`` (the answer is the letter after ``Answer:``)."""
        listed = "".join(
            f" {letter}. {choice}\n" for letter, choice in zip(self.letters, example.choices, strict=False)
        )
        return f"Question: {example.question}\n{listed}Answer:"

    def collate(self, examples: Sequence[Example]) -> Batch:
        rows, truncated = [], 0
        for example in examples:
            if not isinstance(example, MultipleChoiceExample):
                raise TypeError("letter scoring needs multiple-choice examples")
            ids = self.tokenizer(self.prompt(example)).input_ids
            if len(ids) > self.max_length:
                truncated += 1
                ids = ids[-self.max_length :]
            rows.append(ids)
        self._note_truncation(truncated)
        input_ids, attention_mask = _pad(rows, self.tokenizer.pad_token_id, "left")
        return {
            "input_ids": input_ids,  # (B, T)
            "attention_mask": attention_mask,
            "sequence_example": torch.arange(len(examples)),
            "labels": torch.tensor([e.answer for e in examples]),
            "choice_mask": self._choice_mask([e.num_classes for e in examples]),
        }

    def class_logits(self, model: nn.Module, batch: Batch) -> Tensor:
        length = batch["input_ids"].shape[1]
        kwargs = {"position_ids": _positions(batch["attention_mask"])}
        kwargs.update(kept_positions(model, length - 1, length, batch["input_ids"].device))
        with rows_of_examples(batch["sequence_example"]):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        last = out.logits[:, -1, :].float()  # (B, V)
        logits = last[:, self.letter_ids.to(last.device)]  # (B, C)
        return logits.masked_fill(~batch["choice_mask"], float("-inf"))


class ClassificationScorer(Scorer):
    """Sequence classification: the logits of the model's classification head."""

    name = "classification"
    row_groups: ClassVar[dict[str, str]] = {**Scorer.row_groups, "token_type_ids": "sequence"}

    def collate(self, examples: Sequence[Example]) -> Batch:
        if not all(isinstance(e, ClassificationExample) for e in examples):
            raise TypeError("classification scoring needs classification examples")
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples]
        if any(p is None for p in pairs) and not all(p is None for p in pairs):
            raise ValueError("a batch mixes single texts and text pairs")
        labels = [e.label for e in examples]
        if bad := [label for label in labels if not 0 <= label < self.num_classes]:
            raise ValueError(f"label {bad[0]} is out of range for a {self.num_classes}-class head")
        encoded = self.tokenizer(
            texts,
            None if pairs[0] is None else pairs,
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        batch = dict(encoded)
        batch["sequence_example"] = torch.arange(len(examples))
        batch["labels"] = torch.tensor(labels)
        batch["choice_mask"] = torch.ones((len(examples), self.num_classes), dtype=torch.bool)
        return batch

    def class_logits(self, model: nn.Module, batch: Batch) -> Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        with rows_of_examples(batch["sequence_example"]):
            return model(**inputs).logits.float()  # (B, C)


IGNORE = -100  # the label of a token that is not predicted (prompt, padding)


class CompletionScorer(Scorer):
    """Collates prompt + completion rows with labels on the completion's tokens only (see the module docstring).

    Args:
        chat_template: render plain ``prompt``/``completion`` rows with the tokenizer's chat template too (chat rows
            always are).
    """

    name = "completion"
    row_groups: ClassVar[dict[str, str]] = {
        "input_ids": "sequence",
        "attention_mask": "sequence",
        "sequence_example": "sequence",
        "labels": "sequence",
    }
    index_keys: ClassVar[dict[str, str]] = {"sequence_example": "sequence"}  # one row per example

    def __init__(self, tokenizer, max_length: int = 512, chat_template: bool = False) -> None:
        super().__init__(tokenizer, num_classes=0, max_length=max_length)
        self.chat_template = chat_template

    def render(self, example: InstructionExample) -> tuple[str, str]:
        """``(prompt text, completion text)`` as the model sees them."""
        if example.messages is None and not self.chat_template:
            return example.prompt, example.completion + (self.tokenizer.eos_token or "")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("chat rows (or --chat-template) need a tokenizer with a chat template")
        prompt_turns, all_turns = example.chat()
        prompt = self.tokenizer.apply_chat_template(prompt_turns, tokenize=False, add_generation_prompt=True)
        whole = self.tokenizer.apply_chat_template(all_turns, tokenize=False)
        if not whole.startswith(prompt):  # a template that renders the last turn differently: keep its own text
            return prompt, example.completion + (self.tokenizer.eos_token or "")
        return prompt, whole[len(prompt) :]

    def encode(self, example: InstructionExample) -> tuple[list[int], list[int], bool]:
        """Prompt and completion token ids, cut to ``max_length`` (the prompt's start first), and whether cut."""
        prompt, completion = self.render(example)
        head = self.tokenizer(prompt).input_ids if prompt else []
        tail = self.tokenizer(completion, add_special_tokens=False).input_ids
        if not tail:
            raise ValueError(f"completion {example.completion!r} encodes to no tokens")
        truncated = len(head) + len(tail) > self.max_length
        if truncated:
            tail = tail[: self.max_length - 1]
            head = head[-(self.max_length - len(tail)) :] if len(tail) < self.max_length else []
        return head, tail, truncated

    def collate(self, examples: Sequence[Example]) -> Batch:
        if not all(isinstance(e, InstructionExample) for e in examples):
            raise TypeError("completion scoring needs instruction examples (prompt/completion or messages)")
        encoded = [self.encode(e) for e in examples]
        self._note_truncation(sum(cut for _, _, cut in encoded))
        rows = [head + tail for head, tail, _ in encoded]
        ids, mask = _pad(rows, self.tokenizer.pad_token_id, side="right")  # (B, L)
        labels = torch.full_like(ids, IGNORE)
        for i, (head, tail, _) in enumerate(encoded):
            labels[i, len(head) : len(head) + len(tail)] = torch.tensor(tail)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sequence_example": torch.arange(len(rows))}

    def token_log_likelihoods(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(log p(y_t | y_<t), mask)``, each ``(R, L − 1)``: the log-probability of every next token and whether it
        is a completion token (0 elsewhere)."""
        with rows_of_examples(batch["sequence_example"]):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (R, L, V)
        targets = batch["labels"][:, 1:]  # position t predicts token t + 1
        mask = targets != IGNORE
        log_probs = logits[:, :-1].float().log_softmax(-1)  # (R, L - 1, V)
        picked = log_probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)  # (R, L - 1)
        return picked * mask, mask

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """The mean negative log-likelihood of the batch's completion tokens."""
        log_likelihood, mask = self.token_log_likelihoods(model, batch)
        return -log_likelihood.sum() / mask.sum().clamp_min(1), None

    def class_logits(self, model: nn.Module, batch: Batch) -> Tensor:
        raise TypeError("instruction data has no classes: its evaluation is the completions' likelihood")


def make_scorer(
    task: Task,
    tokenizer,
    scoring: Scoring | None = None,
    *,
    max_length: int = 512,
    cloze_normalization: ClozeNormalization = "mean",
    num_classes: int | None = None,
    chat_template: bool = False,
) -> Scorer:
    """The scorer for ``task``: ``classification`` for classification tasks; ``cloze`` (default) or
    ``letter`` for multiple-choice tasks (``chat_template``: cloze prompts through the tokenizer's chat template);
    ``completion`` for instruction data (:class:`CompletionScorer`)."""
    num_classes = num_classes or task.num_classes
    if task.kind == "instruction":
        if scoring not in (None, "completion"):
            raise ValueError(f"task '{task.name}' is instruction data; --scoring {scoring} does not apply")
        return CompletionScorer(tokenizer, max_length, chat_template)
    if chat_template and scoring == "letter":
        raise ValueError("--chat-template applies to cloze scoring (letter scoring lists the choices in its prompt)")
    if task.kind == "classification":
        if scoring not in (None, "classification"):
            raise ValueError(f"task '{task.name}' is a classification task; --scoring {scoring} does not apply")
        return ClassificationScorer(tokenizer, num_classes, max_length)
    if scoring in (None, "cloze"):
        return ClozeScorer(tokenizer, num_classes, max_length, cloze_normalization, chat_template)
    if scoring == "letter":
        return LetterScorer(tokenizer, num_classes, max_length)
    raise ValueError(f"Unknown scoring '{scoring}' for multiple-choice task '{task.name}': use cloze or letter.")
