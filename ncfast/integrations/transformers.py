"""Neural Collapse of Hugging Face causal language models, token by token.

Two entry points (``pip install 'ncfast[transformers]'``):

- :func:`measure_language_model`: one pass over a dataloader of tokenised text, returning the
  SPEC dict (docs/SPEC.md) of the next-token classes plus ``num_tokens``, ``classes_present``
  and ``loss``, the model's mean next-token cross-entropy on the same forward passes::

      from ncfast.integrations.transformers import measure_language_model

      result = measure_language_model(model, loader)   # batches: dicts with input_ids, ...
      result["nc1"], result["nc4_ncc_mismatch"], result["loss"]

- :class:`NeuralCollapseCallback`: a ``transformers.TrainerCallback`` that measures during the
  Trainer's evaluation loop, on the forward passes the loop runs anyway (no extra pass), and logs
  ``eval_nc/<key>`` through the Trainer (its loggers, ``log_history`` and the dict that
  ``evaluate()`` returns)::

      callback = NeuralCollapseCallback()
      trainer = Trainer(model, args, ..., callbacks=[callback])
      callback.attach(trainer)   # or NeuralCollapseCallback.attach_to(trainer)

Any ``AutoModelForCausalLM`` whose output head (``model.get_output_embeddings()``) is an
``nn.Linear`` works (GPT-2, GPT-Neo, Llama-style, ...); the head may be tied to the input
embedding and have no bias. The classes are the head's rows (the vocabulary); the features are
the input of the head, taken by a forward pre-hook: the last hidden state after the model's final
norm, exactly what the head multiplies. Position t's label is the token at t + 1
(:func:`ncfast.tokens.next_token_labels`; a batch's ``labels``, if it has them, are shifted the
same way, as the model's own loss does); padding (``attention_mask`` 0) and ``-100`` labels are
ignored.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ncfast.checks import check_weight_decay
from ncfast.errors import NCFastError, user_stacklevel
from ncfast.measure import scalars
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET
from ncfast.tokens import IGNORE_INDEX, TokenMeasurement, next_token_labels


class UnsupportedModelError(NCFastError, TypeError):
    """The model has no linear output head whose input ncfast can take as the features."""


class BadBatchError(NCFastError, ValueError):
    """A batch of the dataloader is not tokenised text ncfast can measure."""


def output_head(model: nn.Module, where: str) -> nn.Linear:
    """The model's output head (``get_output_embeddings()``, else ``lm_head``), an
    ``nn.Linear`` ``[vocab, P]``; anything else is an :class:`UnsupportedModelError`."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"{where}: model must be a torch.nn.Module (a transformers causal LM), got "
            f"{type(model).__name__}"
        )
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else getattr(model, "lm_head", None)
    if head is None:
        raise UnsupportedModelError(
            f"{where}: model {type(model).__name__} has no output head "
            "(get_output_embeddings() is None and no lm_head): ncfast measures the hidden state "
            "that feeds a linear head over the vocabulary (an AutoModelForCausalLM)"
        )
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"{where}: model's output head is a {type(head).__name__}, not an nn.Linear: the "
            "classifier of Neural Collapse is a linear map of the features (W h + b)"
        )
    return head


class _HeadInput:
    """Forward pre-hook on the head: keeps the last input it saw (``[B, T, P]``), detached."""

    def __init__(self, head: nn.Linear) -> None:
        self.features: torch.Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.features = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None

    def take(self, where: str) -> torch.Tensor:
        features, self.features = self.features, None
        if features is None:
            raise UnsupportedModelError(
                f"{where}: model's forward pass did not call its output head with the hidden "
                "states, so there are no features to measure (a model without hidden states?)"
            )
        return features

    def remove(self) -> None:
        self._handle.remove()


def _batch_parts(
    batch: object, device: torch.device, where: str
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(input_ids, attention_mask, labels) of a batch: a Mapping with ``input_ids`` (and
    optionally ``attention_mask``, ``labels``), or a ``[B, T]`` tensor of token ids."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise BadBatchError(
            f"{where}: each batch must be a dict with 'input_ids' (and optionally "
            "'attention_mask', 'labels') or a [B, T] tensor of token ids, got "
            f"{type(batch).__name__}"
        )
    parts = []
    for key in ("input_ids", "attention_mask", "labels"):
        value = batch.get(key)
        if value is not None and not (isinstance(value, torch.Tensor) and value.dim() == 2):
            raise BadBatchError(
                f"{where}: batch[{key!r}] must be a [B, T] tensor, got "
                f"{getattr(value, 'shape', type(value).__name__)}"
            )
        parts.append(None if value is None else value.to(device))
    return parts[0], parts[1], parts[2]  # type: ignore[return-value]


def _check_token_ids(
    ids: torch.Tensor, vocab_size: int, name: str, where: str, ignore_index: int
) -> None:
    """Token ids within the vocabulary, ``ignore_index`` allowed in labels (read on the host: an
    out-of-range id would fail deep in the embedding, on CUDA as a device-side assert)."""
    valid = ids[ids != ignore_index] if name == "labels" else ids
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab_size):
        raise BadBatchError(
            f"{where}: batch[{name!r}] holds token ids outside the vocabulary [0, {vocab_size}) "
            f"of the model's output head (min {int(valid.min())}, max {int(valid.max())}): does "
            "the tokenizer match the model?"
        )


def _forward_batch(
    model: nn.Module,
    tap: _HeadInput,
    batch: object,
    vocab_size: int,
    ignore_index: int,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One forward pass: (features [B, T, P], aligned labels [B, T], the model's output)."""
    device = next(model.parameters()).device
    ids, mask, given = _batch_parts(batch, device, where)
    _check_token_ids(ids, vocab_size, "input_ids", where, ignore_index)
    if given is not None:
        _check_token_ids(given, vocab_size, "labels", where, ignore_index)
    labels = next_token_labels(
        ids if given is None else given, mask if given is None else None, ignore_index
    )
    output = model(input_ids=ids, attention_mask=mask)
    features = tap.take(where)
    if features.shape[:-1] != labels.shape:
        raise UnsupportedModelError(
            f"{where}: the output head saw features of shape {list(features.shape)}, not one "
            f"per position of input_ids {list(labels.shape)}"
        )
    return features, labels, output


def measure_language_model(
    model: nn.Module,
    dataloader: Iterable[object],
    *,
    ignore_index: int = IGNORE_INDEX,
    weight_decay: float = 0.0,
    nc4: bool = True,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    counts: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Neural Collapse of ``model``'s next-token features over ``dataloader``, in one pass.

    ``dataloader`` yields dicts with ``input_ids`` ``[B, T]`` and optionally ``attention_mask``
    and ``labels`` (Hugging Face's unshifted labels, -100 where ignored), or ``[B, T]`` tensors
    of token ids; it must be iterable twice when NC4's feature buffer overflows
    ``memory_budget_bytes`` (the pass is then run again for NC4 only). The model runs in eval
    mode without gradients, on its own device, and is put back in its mode afterwards.

    Returns the SPEC dict (:func:`ncfast.nc_metrics`; ``num_samples`` = ``num_tokens``, the
    positions measured; ``classes_present``, the distinct next tokens) plus ``loss``, the mean
    cross-entropy of the model's logits against the same labels on the same forward passes (the
    model's own causal-LM loss, weighted by tokens across batches), ``ignored_tokens`` and
    ``passes`` (1, or 2 with the NC4 second pass); with ``counts=True``, ``token_counts``: the
    int64 ``[vocab]`` count of each next token. Bad input raises :class:`UnsupportedModelError`
    (no linear head, a forward that does not call it) or :class:`BadBatchError`.
    """
    where = "measure_language_model"
    head = output_head(model, where)
    weight_decay = check_weight_decay(weight_decay, where)
    vocab_size = head.out_features
    tokens = TokenMeasurement(
        vocab_size,
        head.in_features,
        head.weight,
        head.bias,
        ignore_index=ignore_index,
        weight_decay=weight_decay,
        memory_budget_bytes=memory_budget_bytes,
    )
    was_training = model.training
    tap = _HeadInput(head)
    loss_sum = torch.zeros((), dtype=torch.float64)
    model.eval()
    try:
        # The bar counts the batches; it does not iterate the dataloader: tqdm.auto's class
        # calls iter() once on construction, which would start a DataLoader's workers twice.
        bar = tqdm(total=_length(dataloader), desc="measuring tokens", disable=not progress)
        with torch.no_grad(), bar:
            for batch in dataloader:
                bar.update(1)
                features, labels, output = _forward_batch(
                    model, tap, batch, vocab_size, ignore_index, where
                )
                tokens.update(features, labels)
                logits = output.logits.reshape(-1, vocab_size)
                loss_sum = loss_sum.to(logits.device) + F.cross_entropy(
                    logits.to(torch.float64),
                    labels.reshape(-1),
                    ignore_index=ignore_index,
                    reduction="sum",
                )
            passes = 2 if nc4 and tokens.measurement.needs_second_pass else 1

            def second_pass() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                for batch in dataloader:
                    features, labels, _ = _forward_batch(
                        model, tap, batch, vocab_size, ignore_index, where
                    )
                    yield features, labels

            metrics: dict[str, Any] = dict(
                tokens.compute(second_pass if passes == 2 else None, nc4=nc4)
            )
    finally:
        tap.remove()
        model.train(was_training)
    num_tokens = tokens.num_tokens
    metrics.update(
        num_tokens=num_tokens,
        loss=float(loss_sum) / num_tokens if num_tokens else math.nan,
        ignored_tokens=tokens.ignored_tokens,
        passes=passes,
    )
    if counts:
        metrics["token_counts"] = tokens.counts.cpu()
    return metrics


class NeuralCollapseCallback(TrainerCallback):  # type: ignore[misc]
    """Measures token-level Neural Collapse in the Trainer's evaluation loop and logs it.

    While the model runs in eval mode, a forward pre-hook on the model reads each batch's
    ``labels`` (else ``input_ids`` and ``attention_mask``) and one on the output head takes the
    features of the same forward pass; the pass is measured when the evaluation loop reports its
    step (``on_prediction_step``), so other eval-mode passes are not, and measuring costs no
    extra forward pass.
    At ``on_evaluate`` the metrics are computed and added as ``{split}_{prefix}{key}`` (e.g.
    ``eval_nc/nc1``; Trainer's TensorBoard logger shows ``eval/nc/nc1``): into the dict that
    ``trainer.evaluate()`` returns (so ``metric_for_best_model`` can name them) and, when the
    callback knows the trainer (:meth:`attach`), through ``trainer.log`` to every logger and
    ``state.log_history``; without it, into ``state.log_history`` only. Degenerate features
    (early in training every position may predict alike) log NaN with ``nc_undefined``, and a
    ``RuntimeWarning`` says why.

    NC4 buffers the features of the pass up to ``memory_budget_bytes``; past it (the loop cannot
    be replayed) NC4 is left out of that evaluation. Under ``torch.distributed`` the statistics of
    all ranks are reduced exactly. Prediction passes (``trainer.predict``) are not measured.
    """

    def __init__(
        self,
        *,
        prefix: str = "nc/",
        ignore_index: int = IGNORE_INDEX,
        weight_decay: float = 0.0,
        nc4: bool = True,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        self.prefix = prefix
        self.ignore_index = ignore_index
        self.weight_decay = check_weight_decay(weight_decay, "NeuralCollapseCallback")
        self.nc4 = nc4
        self.memory_budget_bytes = memory_budget_bytes
        self.trainer: Any = None
        self.history: list[dict[str, Any]] = []
        self._model: nn.Module | None = None
        self._head: nn.Linear | None = None
        self._handles: list[Any] = []
        self._tokens: TokenMeasurement | None = None
        self._pending: torch.Tensor | None = None
        # The eval-mode forward pass seen last, measured when the loop's step ends.
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def attach_to(cls, trainer: Any, **options: Any) -> NeuralCollapseCallback:
        """A new callback, added to ``trainer`` (:meth:`attach`)."""
        callback = cls(**options)
        trainer.add_callback(callback)
        return callback.attach(trainer)

    def attach(self, trainer: Any) -> NeuralCollapseCallback:
        """Know ``trainer`` (to log through ``trainer.log``) and hook its model now."""
        self.trainer = trainer
        self._hook(trainer.model)
        return self

    # ----------------------------------------------------------------- hooks
    def _hook(self, model: nn.Module | None) -> None:
        if model is None or model is self._model:
            return
        self.close()
        head = output_head(model, "NeuralCollapseCallback")
        self._model, self._head = model, head
        self._handles = [
            model.register_forward_pre_hook(self._on_model_inputs, with_kwargs=True),
            head.register_forward_pre_hook(self._on_features),
        ]

    def _on_model_inputs(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._pending = None
        if module.training:
            return
        given, ids = kwargs.get("labels"), kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if isinstance(given, torch.Tensor) and given.dim() == 2:
            self._pending = next_token_labels(given, None, self.ignore_index)
        elif isinstance(ids, torch.Tensor) and ids.dim() == 2:
            mask = kwargs.get("attention_mask")
            mask = mask if isinstance(mask, torch.Tensor) and mask.shape == ids.shape else None
            self._pending = next_token_labels(ids, mask, self.ignore_index)

    def _on_features(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        labels, self._pending = self._pending, None
        if labels is None or not args:
            return
        features = args[0]
        # e.g. generation with logits for the last position only: not a measured pass.
        if isinstance(features, torch.Tensor) and features.shape[:-1] == labels.shape:
            self._last = (features.detach(), labels.to(features.device))

    def close(self) -> None:
        """Remove the hooks (a new model is hooked at the next event that brings one)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._model, self._head, self._tokens = [], None, None, None
        self._pending = self._last = None

    # ---------------------------------------------------------------- events
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._hook(kwargs.get("model"))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._hook(kwargs.get("model"))

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Only the forward passes of the Trainer's loop count, not other eval-mode passes.
        last, self._last = self._last, None
        if last is None or self._head is None:
            return
        if self._tokens is None:
            # The head as it is now: NC4 keeps a float64 copy of it for the whole evaluation.
            head = self._head
            self._tokens = TokenMeasurement(
                head.out_features,
                head.in_features,
                head.weight,
                head.bias,
                ignore_index=self.ignore_index,
                weight_decay=self.weight_decay,
                memory_budget_bytes=self.memory_budget_bytes,
            )
        self._tokens.update(*last)

    def on_predict(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._tokens = None

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
    ) -> None:
        tokens = self._tokens
        if tokens is None or tokens.stats.num_samples == 0:
            return
        split = _split_of(metrics)
        result = self._compute(tokens)
        self._tokens = None  # the next evaluation measures the head as it is then
        if "nc_undefined" in result:
            warnings.warn(
                f"NeuralCollapseCallback: metrics undefined at step {state.global_step}, "
                f"logged as NaN: {result['nc_undefined']}",
                RuntimeWarning,
                stacklevel=user_stacklevel("transformers"),
            )
        logged = scalars(result, f"{split}_{self.prefix}")
        self.history.append({"step": state.global_step, **result})
        if isinstance(metrics, dict):
            metrics.update(logged)
        if self.trainer is not None:
            self.trainer.log(dict(logged))
        else:
            state.log_history.append({**logged, "step": state.global_step})

    def _compute(self, tokens: TokenMeasurement) -> dict[str, Any]:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        nc4 = self.nc4 and not tokens.measurement.needs_second_pass
        # Fewer than two next-token classes seen, or means that do not separate: a NaN row
        # with the reason (nc_undefined), never a training run stopped at its evaluation.
        result: dict[str, Any] = dict(
            tokens.compute(distributed=distributed, nc4=nc4, on_degenerate="nan")
        )
        result["num_tokens"] = result.pop("num_samples")
        return result


def _length(dataloader: Any) -> int | None:
    """The number of batches, or None (a generator; an IterableDataset's DataLoader raises)."""
    try:
        return len(dataloader)
    except TypeError:
        return None


def _split_of(metrics: object) -> str:
    """The Trainer's metric prefix of this evaluation (``eval``, ``eval_<name>``, ...), read
    from the ``<prefix>_runtime`` key its speed metrics always add."""
    if isinstance(metrics, Mapping):
        for key in metrics:
            if isinstance(key, str) and key.endswith("_runtime"):
                return key[: -len("_runtime")]
    return "eval"


__all__ = [
    "BadBatchError",
    "NeuralCollapseCallback",
    "UnsupportedModelError",
    "measure_language_model",
    "output_head",
]
