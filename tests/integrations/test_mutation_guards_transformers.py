"""Guards of ncfast.integrations.transformers against small mutants.

:func:`measure_language_model`: the defaults (no weight decay, NC4 on, no counts, no progress
bar), each option reaching the result (weight decay, ignore_index with labels that use it,
counts, nc4 off, the NC4 second pass over the dataloader iterated twice), the model put in eval
mode for the pass and back in its mode afterwards with no hook left (an error included), the
attention mask handed to the forward (left padding), a batch's labels taking precedence over its
mask, the loss as the token-weighted float64 cross-entropy (a float32 model too), and every bad
input with the argument it names: batches (keys, shapes, ids outside the vocabulary, the ignore
index allowed in labels only), heads (found by ``get_output_embeddings`` or ``lm_head``,
missing, called by keyword, never or not always called, fed one position only).

:class:`NeuralCollapseCallback`, called directly with stand-ins for the Trainer's state and
trainer: what is measured (eval-mode passes that the loop reports with ``on_prediction_step``;
not training passes, passes it does not report, generation-like passes, ``inputs_embeds``
passes, predictions), where it goes (the metrics dict, ``trainer.log`` once, else
``state.log_history``; the split read from ``<split>_runtime``; ``history`` with the step), the
options (prefix, ignore_index, weight decay, nc4, the NC4 budget), a fresh measurement per
evaluation, a degenerate evaluation as a NaN row, hooking at ``on_init_end``/``on_train_begin``
(the same model kept, a new one moved to), ``close``, and ``attach_to``.

Values are compared with :class:`ncfast.tokens.TokenMeasurement` fed the same features (the
head's input, from the same forward code: bit for bit) and with the cross-entropy computed by
hand in float64 (rel 1e-12: sums of ~100 terms of size ~log V, N·eps64 ≈ 1e-14). Tiny
random float64 GPT-2 models (seeded by the ``seed`` fixture, NCFAST_TEST_SEED replays) and
hand-made modules; the whole file runs in a few seconds."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers.trainer_callback import CallbackHandler, TrainerControl  # noqa: E402

from ncfast.integrations.transformers import (  # noqa: E402
    BadBatchError,
    NeuralCollapseCallback,
    UnsupportedModelError,
    measure_language_model,
)
from ncfast.measure import scalars  # noqa: E402
from ncfast.tokens import TokenMeasurement, next_token_labels  # noqa: E402
from tests.helpers.assertions import assert_same_metrics  # noqa: E402
from tests.helpers.language_models import tiny_gpt2  # noqa: E402
from tests.helpers.process_group import free_port, gloo_group  # noqa: E402
from tests.helpers.tolerances import oracle_rtol  # noqa: E402
from tests.helpers.warning_origin import assert_warned_from  # noqa: E402

VOCAB, DIM, SEQ = 24, 8, 10
F64 = torch.float64
LOSS_RTOL = 1e-12  # float64 sums of ~100 cross-entropy terms: N·eps64 ≈ 1e-14
BOOKKEEPING = ("loss", "num_tokens", "ignored_tokens", "passes", "token_counts")


def gpt2(seed: int) -> nn.Module:
    return tiny_gpt2(seed, VOCAB, DIM, SEQ)


def batches_of(seed: int, sizes=(3, 5), left_pad: bool = False) -> list[dict]:
    """Dicts of input_ids and attention_mask, of ``sizes`` sequences, some padded (token 0) on
    the right (or on the left)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for size in sizes:
        ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (size,), generator=g)
        lengths[0] = SEQ // 2  # at least one padded sequence
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        if left_pad:
            mask = mask.flip(1)
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def features_of(model: nn.Module, batch: dict) -> torch.Tensor:
    """The head's input: GPT-2's final hidden state (after its final norm), by its base model."""
    with torch.no_grad():
        return model.base_model(
            input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
        ).last_hidden_state


def by_hand(model, batches, labels_of=None, **options) -> TokenMeasurement:
    """TokenMeasurement fed the final hidden states of ``batches`` and ``labels_of(batch)``
    (default: next_token_labels of input_ids and attention_mask)."""
    head = model.get_output_embeddings()
    tokens = TokenMeasurement(VOCAB, DIM, head.weight, head.bias, **options)
    for batch in batches:
        labels = (
            labels_of(batch)
            if labels_of
            else next_token_labels(batch["input_ids"], batch["attention_mask"])
        )
        tokens.update(features_of(model, batch), labels)
    return tokens


def loss_by_hand(model, batches, labels_of=None, ignore_index=-100) -> float:
    """The float64 cross-entropy of the model's logits, summed over every batch's tokens and
    divided by their number."""
    total, count = 0.0, 0
    for batch in batches:
        labels = (
            labels_of(batch)
            if labels_of
            else next_token_labels(batch["input_ids"], batch["attention_mask"])
        )
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")
            ).logits
        total += float(
            F.cross_entropy(
                logits.reshape(-1, VOCAB).double(),
                labels.reshape(-1),
                ignore_index=ignore_index,
                reduction="sum",
            )
        )
        count += int((labels != ignore_index).sum())
    return total / count


def metrics_only(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in BOOKKEEPING}


# ------------------------------------------------------------------ measure_language_model
def test_defaults_loss_and_bookkeeping(seed, capsys):
    model = gpt2(seed)
    batches = batches_of(seed)
    result = measure_language_model(model, batches)
    tokens = by_hand(model, batches)
    assert_same_metrics(metrics_only(result), dict(tokens.compute()))
    assert result["weight_decay"] == 0.0 and "nc4_ncc_mismatch" in result
    assert "token_counts" not in result and result["passes"] == 1
    assert result["num_tokens"] == tokens.num_tokens == result["num_samples"] > 0
    assert result["ignored_tokens"] == 8 * SEQ - tokens.num_tokens
    # Token-weighted over batches of different sizes, not a mean of the batches' means.
    assert result["loss"] == pytest.approx(loss_by_hand(model, batches), rel=LOSS_RTOL)
    assert capsys.readouterr().err == ""  # no progress bar by default
    measure_language_model(model, batches, progress=True)
    # tqdm's "desc: ", and the batches counted against the dataloader's length to the end.
    err = capsys.readouterr().err
    assert re.search(r"(^|\r)measuring tokens: ", err) and " 2/2 [" in err, err


class ChangingLoader:
    """Good batches on the first pass, a batch with an id outside the vocabulary after."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        if self.passes == 1:
            return iter(self.batches)
        bad = dict(self.batches[0], input_ids=self.batches[0]["input_ids"] + 10**6)
        return iter([bad])


def test_a_bad_batch_in_the_second_pass_names_the_function(seed):
    model = gpt2(seed)
    with pytest.raises(BadBatchError, match=r"^measure_language_model: batch\['input_ids'\]"):
        measure_language_model(model, ChangingLoader(batches_of(seed)), memory_budget_bytes=0)


def test_options_reach_the_result(seed):
    model = gpt2(seed)
    batches = batches_of(seed)
    default = measure_language_model(model, batches)
    result = measure_language_model(model, batches, weight_decay=0.25, counts=True)
    expected = dict(by_hand(model, batches, weight_decay=0.25).compute())
    assert_same_metrics(metrics_only(result), expected)
    assert result["weight_decay"] == 0.25 and result["loss_mse"] != default["loss_mse"]
    labels = torch.cat([next_token_labels(b["input_ids"], b["attention_mask"]) for b in batches])
    counts = result["token_counts"]
    assert counts.dtype == torch.int64 and torch.equal(
        counts, torch.bincount(labels[labels != -100], minlength=VOCAB)
    )
    # NC4 off: no NC4 key and one pass, whatever the budget.
    off = measure_language_model(model, batches, nc4=False, memory_budget_bytes=0)
    assert "nc4_ncc_mismatch" not in off and off["passes"] == 1
    assert off["nc1"] == default["nc1"]
    with pytest.raises(ValueError, match=r"measure_language_model: weight_decay .* got -1"):
        measure_language_model(model, batches, weight_decay=-1.0)


class Twice:
    """A dataloader that counts how many times it is iterated."""

    def __init__(self, batches):
        self.batches, self.iterations = batches, 0

    def __iter__(self):
        # Counted at iter(), as a DataLoader starts its workers there.
        self.iterations += 1
        return iter(self.batches)


class Streamed(torch.utils.data.IterableDataset):
    """Batches from an iterable dataset: its DataLoader has no length."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_nc4_second_pass_iterates_the_dataloader_again(seed):
    model = gpt2(seed)
    batches = batches_of(seed)
    loader = Twice(batches)
    two = measure_language_model(model, loader, memory_budget_bytes=0)
    one = measure_language_model(model, batches)
    assert (two["passes"], loader.iterations) == (2, 2)
    once = Twice(batches)
    measure_language_model(model, once, progress=True)
    assert once.iterations == 1  # the progress bar does not iterate it again
    streamed = torch.utils.data.DataLoader(Streamed(batches), batch_size=None)
    assert_same_metrics(
        metrics_only(measure_language_model(model, streamed, progress=True)), metrics_only(one)
    )
    assert_same_metrics(metrics_only(two), metrics_only(one))
    assert two["loss"] == one["loss"]  # the loss of the first pass only


def test_eval_mode_for_the_pass_and_the_mode_and_hooks_restored(seed):
    model = gpt2(seed).train()  # dropout 0.1: a training-mode pass would change the features
    head = model.get_output_embeddings()
    batches = batches_of(seed)
    result = measure_language_model(model, batches)
    assert model.training and not head._forward_pre_hooks
    model.eval()
    assert_same_metrics(metrics_only(result), dict(by_hand(model, batches).compute()))
    # An error in the pass restores them too.
    model.train()
    bad = [batches[0], {"input_ids": torch.full((2, SEQ), VOCAB)}]
    with pytest.raises(BadBatchError):
        measure_language_model(model, bad)
    assert model.training and not head._forward_pre_hooks


def test_the_mask_goes_to_the_forward_and_labels_rule_over_it(seed):
    model = gpt2(seed)
    # Left padding: the mask changes the real tokens' features (they no longer attend to pads).
    left = batches_of(seed, left_pad=True)
    result = measure_language_model(model, left)
    assert_same_metrics(metrics_only(result), dict(by_hand(model, left).compute()))
    assert result["loss"] == pytest.approx(loss_by_hand(model, left), rel=LOSS_RTOL)
    # A batch's labels decide the tokens, as in the model's own loss: -100 where they say so,
    # even where the mask is 1, and the padded positions counted where they do not.
    batch = batches_of(seed + 1, sizes=(4,))[0]
    labels = batch["input_ids"].clone()
    labels[:, :3] = -100
    with_labels = [{**batch, "labels": labels}]
    got = measure_language_model(model, with_labels)

    def from_labels(b):
        return next_token_labels(b["labels"])

    assert got["num_tokens"] == 4 * (SEQ - 1 - 2)
    assert got["ignored_tokens"] == 4 * 3
    assert_same_metrics(metrics_only(got), dict(by_hand(model, with_labels, from_labels).compute()))
    assert got["loss"] == pytest.approx(
        loss_by_hand(model, with_labels, from_labels), rel=LOSS_RTOL
    )


def test_ignore_index_of_the_labels(seed):
    """Labels that mark ignored positions with the ``ignore_index`` given (here -1) are
    measured with it; they used to be rejected as token ids outside the vocabulary."""
    model = gpt2(seed)
    batch = batches_of(seed, sizes=(4,))[0]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -1)
    given = [{"input_ids": batch["input_ids"], "labels": labels}]

    def from_labels(b):
        return next_token_labels(b["labels"], None, -1)

    result = measure_language_model(model, given, ignore_index=-1)
    expected = by_hand(model, given, from_labels, ignore_index=-1)
    assert_same_metrics(metrics_only(result), dict(expected.compute()))
    assert result["num_tokens"] == expected.num_tokens < 4 * (SEQ - 1)
    assert result["loss"] == pytest.approx(
        loss_by_hand(model, given, from_labels, ignore_index=-1), rel=LOSS_RTOL
    )
    # -100 is no ignore mark under ignore_index=-1: an id outside the vocabulary.
    with pytest.raises(BadBatchError, match=r"batch\['labels'\] holds token ids .*min -100"):
        measure_language_model(
            model, [{**given[0], "labels": labels.masked_fill(labels == -1, -100)}], ignore_index=-1
        )


def test_loss_of_a_float32_model_is_summed_in_float64(seed):
    model = gpt2(seed).float()
    batches = batches_of(seed)
    result = measure_language_model(model, batches)
    # float32 sums would be off by ~1e-7 relative; float64 ones by ~1e-14.
    assert result["loss"] == pytest.approx(loss_by_hand(model, batches), rel=LOSS_RTOL)


def test_bad_batches_name_the_argument(seed):
    model = gpt2(seed)
    ids = torch.randint(1, VOCAB, (2, 4))
    where = "measure_language_model: "
    cases = [
        ({"attention_mask": torch.ones(2, 4)}, "each batch must be a dict with 'input_ids'"),
        (ids[0], r"batch\['input_ids'\] must be a \[B, T\] tensor, got torch.Size\(\[4\]\)"),
        ({"input_ids": ids, "attention_mask": torch.ones(2, 4, 1)}, r"batch\['attention_mask'\]"),
        ({"input_ids": ids, "labels": ids.tolist()}, r"batch\['labels'\] must be .*got list"),
        ({"input_ids": ids.masked_fill(ids == ids[0, 0], -100)}, r"input_ids'\] holds.*min -100"),
        ({"input_ids": ids, "labels": ids - ids - 1}, r"batch\['labels'\] holds.*min -1,"),
        ({"input_ids": ids, "labels": ids * 0 + VOCAB}, rf"labels'\] holds.*max {VOCAB}\)"),
    ]
    for batch, message in cases:
        with pytest.raises(BadBatchError, match=where + ".*" + message):
            measure_language_model(model, [batch])
    # Token 0 and VOCAB - 1 are in the vocabulary; labels may be all -100 in a batch.
    edge = ids.clone()
    edge[0, 0], edge[1, 2] = 0, VOCAB - 1
    fine = [{"input_ids": edge}, {"input_ids": ids, "labels": torch.full_like(ids, -100)}]
    assert measure_language_model(model, fine)["num_tokens"] == 2 * 3


class Tiny(nn.Module):
    """Embedding → tanh → head, float64, with the head found and called in several ways:
    ``head_name`` ``"lm_head"`` (found as an attribute) or ``"out"`` (by get_output_embeddings);
    ``call``: ``"positional"``, ``"keyword"`` (head(input=h)), ``"last"`` (the last position
    only), ``"once"`` (the first forward only), ``"never"``."""

    def __init__(self, seed: int, head_name: str = "out", call: str = "positional"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, DIM, dtype=F64)
        head = nn.Linear(DIM, VOCAB, dtype=F64)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(VOCAB, DIM, generator=g, dtype=F64))
            head.weight.copy_(torch.randn(VOCAB, DIM, generator=g, dtype=F64))
            head.bias.copy_(torch.randn(VOCAB, generator=g, dtype=F64))
        setattr(self, head_name, head)
        self.head_name, self.call, self.calls = head_name, call, 0

    def get_output_embeddings(self):
        return self.out if self.head_name == "out" else None

    def forward(self, input_ids, attention_mask=None, labels=None):
        hidden = torch.tanh(self.embed(input_ids))
        head = getattr(self, self.head_name)
        self.calls += 1
        if self.call == "keyword":
            logits = head(input=hidden)
        elif self.call == "last":
            logits = head(hidden[:, -1:])
        elif self.call == "never" or (self.call == "once" and self.calls > 1):
            logits = torch.zeros(*input_ids.shape, VOCAB, dtype=F64)
        else:
            logits = head(hidden)
        return SimpleNamespace(logits=logits)


def test_the_head_found_and_taken(seed):
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(seed))
    model = Tiny(seed)  # found by get_output_embeddings; no lm_head
    result = measure_language_model(model, [ids])
    expected = TokenMeasurement(VOCAB, DIM, model.out.weight, model.out.bias)
    expected.update(torch.tanh(model.embed(ids)).detach(), next_token_labels(ids))
    assert_same_metrics(metrics_only(result), dict(expected.compute()))

    class LmHeadOnly(nn.Module):  # no get_output_embeddings: its lm_head
        def __init__(self):
            super().__init__()
            self.inner = Tiny(seed, head_name="lm_head")
            self.lm_head = self.inner.lm_head

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids)

    again = measure_language_model(LmHeadOnly(), [ids])
    assert_same_metrics(metrics_only(again), metrics_only(result))


def test_bad_models_name_the_model_and_the_head(seed):
    ids = torch.randint(0, VOCAB, (2, 6))
    where = "measure_language_model: "
    with pytest.raises(UnsupportedModelError, match=where + "model Tiny has no output head"):
        measure_language_model(Tiny(seed, head_name="lm_head"), [ids])  # getter gives None
    with pytest.raises(UnsupportedModelError, match=where + "model Sequential has no output head"):
        measure_language_model(nn.Sequential(nn.Linear(2, 2)), [ids])
    with pytest.raises(UnsupportedModelError, match=where + "model's forward pass did not call"):
        measure_language_model(Tiny(seed, call="keyword"), [ids])
    with pytest.raises(UnsupportedModelError, match=where + "model's forward pass did not call"):
        measure_language_model(Tiny(seed, call="never"), [ids])
    # A pass that skips the head does not reuse the features of the previous pass.
    with pytest.raises(UnsupportedModelError, match=where + "model's forward pass did not call"):
        measure_language_model(Tiny(seed, call="once"), [ids, ids])
    with pytest.raises(
        UnsupportedModelError,
        match=where + r"the output head saw features of shape \[2, 1, 8\], not one per position "
        r"of input_ids \[2, 6\]",
    ):
        measure_language_model(Tiny(seed, call="last"), [ids])


# ------------------------------------------------------------------ NeuralCollapseCallback
def stand_ins(model, step: int = 7):
    """(trainer, state): ``trainer.log`` records its calls; ``state`` has a global step and
    a log history."""
    logs: list[dict] = []
    added: list = []
    trainer = SimpleNamespace(model=model, log=logs.append, add_callback=added.append)
    trainer.logs, trainer.added = logs, added
    return trainer, SimpleNamespace(global_step=step, log_history=[])


def evaluation_loop(callback, model, state, batches, with_labels=True):
    """The Trainer's evaluation loop as the callback sees it: an eval-mode forward per batch
    (labels as the collator gives them, or none), each reported by ``on_prediction_step``."""
    model.eval()
    for batch in batches:
        kwargs = dict(batch)
        if with_labels:
            kwargs["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with torch.no_grad():
            model(**kwargs)
        callback.on_prediction_step(None, state, None)


def expected_row(model, batches, **options) -> dict:
    """What the callback reports for ``batches``: measure_language_model's metrics with
    ``num_tokens`` for ``num_samples``."""
    result = measure_language_model(model, batches, **options)
    row = metrics_only(result)
    row["num_tokens"] = row.pop("num_samples")
    return row


def test_callback_defaults_log_through_the_trainer(seed):
    model = gpt2(seed)
    batches = batches_of(seed)
    trainer, state = stand_ins(model)
    callback = NeuralCollapseCallback()
    assert callback.attach(trainer) is callback
    evaluation_loop(callback, model, state, batches)
    metrics = {"eval_loss": 1.0, "eval_runtime": 0.5}
    callback.on_evaluate(None, state, None, metrics=metrics)
    row = expected_row(model, batches)
    assert row["weight_decay"] == 0.0 and "nc4_ncc_mismatch" in row
    logged = scalars(row, "eval_nc/")
    assert metrics == {"eval_loss": 1.0, "eval_runtime": 0.5, **logged}
    assert trainer.logs == [logged]
    assert state.log_history == []  # trainer.log keeps its own history
    assert len(callback.history) == 1
    assert_same_metrics(callback.history[0], {"step": 7, **row})


def test_callback_without_a_trainer_writes_the_log_history(seed):
    model = gpt2(seed)
    batches = batches_of(seed)
    _, state = stand_ins(model, step=3)
    callback = NeuralCollapseCallback()
    callback.on_init_end(None, state, None, model=model)
    evaluation_loop(callback, model, state, batches, with_labels=False)  # ids and mask
    callback.on_evaluate(None, state, None)  # no metrics dict: the split is "eval"
    logged = scalars(expected_row(model, batches), "eval_nc/")
    assert state.log_history == [{**logged, "step": 3}]
    # The split of a named evaluation set, from its <split>_runtime key.
    other = NeuralCollapseCallback()
    other.on_train_begin(None, state, None, model=model)
    evaluation_loop(other, model, state, batches)
    metrics = {3: "not a str", "eval_val_loss": 2.0, "eval_val_runtime": 0.1}
    other.on_evaluate(None, state, None, metrics=metrics)
    assert metrics == {
        3: "not a str",
        "eval_val_loss": 2.0,
        "eval_val_runtime": 0.1,
        **scalars(expected_row(model, batches), "eval_val_nc/"),
    }


def test_callback_options(seed):
    model = gpt2(seed)
    batches = batches_of(seed)
    trainer, state = stand_ins(model)
    callback = NeuralCollapseCallback(prefix="x/", ignore_index=-1, weight_decay=0.25, nc4=False)
    callback.attach(trainer)
    evaluation_loop(callback, model, state, batches, with_labels=False)  # padding marked -1
    callback.on_evaluate(None, state, None, metrics={"eval_runtime": 1.0})
    row = expected_row(model, batches, ignore_index=-1, weight_decay=0.25, nc4=False)
    assert "nc4_ncc_mismatch" not in row and row["weight_decay"] == 0.25
    assert trainer.logs == [scalars(row, "eval_x/")]
    assert_same_metrics(callback.history[0], {"step": 7, **row})

    tiny = Tiny(seed)
    trainer, state = stand_ins(tiny)
    callback = NeuralCollapseCallback(ignore_index=-1, memory_budget_bytes=0).attach(trainer)
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, 4:] = -1
    tiny.eval()
    with torch.no_grad():
        tiny(input_ids=ids, labels=labels)
    callback.on_prediction_step(None, state, None)
    callback.on_evaluate(None, state, None)
    got = callback.history[0]
    assert "nc4_ncc_mismatch" not in got and "nc1" in got  # over the NC4 budget: left out
    expected = measure_language_model(tiny, [{"input_ids": ids, "labels": labels}], ignore_index=-1)
    assert got["num_tokens"] == expected["num_tokens"] == 3 * 3
    assert got["nc1"] == expected["nc1"]


def test_callback_measures_only_the_passes_the_loop_reports(seed):
    model = gpt2(seed)
    batches = batches_of(seed)
    trainer, state = stand_ins(model)
    callback = NeuralCollapseCallback.attach_to(trainer, prefix="p/")
    assert trainer.added == [callback] and callback.trainer is trainer
    ids = batches[0]["input_ids"]
    callback.on_prediction_step(None, state, None)  # nothing seen yet: nothing measured
    model.train()
    model(input_ids=ids)  # a training pass
    callback.on_prediction_step(None, state, None)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids[:, :3])  # an eval pass the loop does not report, replaced by ...
        model(ids)  # ... a positional one it does
        head = model.get_output_embeddings()
        head(torch.zeros(*ids.shape, DIM, dtype=F64))  # the head alone: not a model pass
        callback.on_prediction_step(None, state, None)
        model(inputs_embeds=model.transformer.wte(ids))  # no ids: not measured
        callback.on_prediction_step(None, state, None)
        model(input_ids=ids, logits_to_keep=1)  # generation-like: the last position only
        callback.on_prediction_step(None, state, None)
    callback.on_evaluate(None, state, None, metrics={})
    (logged,) = trainer.logs
    expected = expected_row(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert logged == scalars(expected, "eval_p/")
    # A prediction run drops what was measured; an evaluation with nothing measured (or only
    # ignored positions) logs nothing.
    evaluation_loop(callback, model, state, batches)
    callback.on_predict(None, state, None)
    callback.on_evaluate(None, state, None)
    all_ignored = [{**b, "attention_mask": torch.zeros_like(b["input_ids"])} for b in batches]
    evaluation_loop(callback, model, state, all_ignored)
    callback.on_evaluate(None, state, None)
    assert len(trainer.logs) == 1 and len(callback.history) == 1


def test_callback_measures_each_evaluation_afresh(seed):
    model = gpt2(seed)
    first, second = batches_of(seed), batches_of(seed + 1, sizes=(4,))
    trainer, state = stand_ins(model)
    callback = NeuralCollapseCallback().attach(trainer)
    evaluation_loop(callback, model, state, first)
    callback.on_evaluate(None, state, None)
    with torch.no_grad():  # training moves the head: the next evaluation measures it as it is
        model.lm_head.weight.mul_(2.0)
    state.global_step = 9
    evaluation_loop(callback, model, state, second)
    callback.on_evaluate(None, state, None)
    assert [row["step"] for row in callback.history] == [7, 9]
    assert_same_metrics(callback.history[1], {"step": 9, **expected_row(model, second)})


def test_callback_degenerate_evaluation_is_a_nan_row(seed):
    model = Tiny(seed)
    with torch.no_grad():
        model.embed.weight.zero_()  # every position has the same feature: no class separates
    trainer, state = stand_ins(model)
    callback = NeuralCollapseCallback(weight_decay=0.5).attach(trainer)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    evaluation_loop(callback, model, state, [{"input_ids": ids, "attention_mask": ids * 0 + 1}])
    # A NaN row is also said at once (as Lightning's callback does: a logged NaN alone is easy
    # to miss), pointing past transformers' frames at the line that ran the evaluation.
    handler = CallbackHandler([callback], model, None, None, None)
    with pytest.warns(RuntimeWarning, match="undefined at step 7, logged as NaN: ") as caught:
        handler.on_evaluate(None, state, TrainerControl(), metrics={})
    (said,) = [w for w in caught if "undefined at step" in str(w.message)]
    assert_warned_from(said, __file__)
    row = callback.history[0]
    assert isinstance(row["nc_undefined"], str) and row["weight_decay"] == 0.5
    assert math.isnan(row["nc1"]) and row["num_tokens"] == 2 * (SEQ - 1)
    assert row["classes_present"] == len(ids[:, 1:].unique())
    (logged,) = trainer.logs
    assert math.isnan(logged["eval_nc/nc1"]) and "eval_nc/nc_undefined" not in logged
    assert logged["eval_nc/num_tokens"] == 2 * (SEQ - 1)


def test_callback_measures_a_head_with_a_bias(seed):
    """A head with a bias (Tiny's; GPT-2's has none): the callback measures the classifier
    (W, b) as measure_language_model does, bias included (NC4's classifier uses it)."""
    model = Tiny(seed)
    batches = batches_of(seed)
    trainer, state = stand_ins(model)
    callback = NeuralCollapseCallback().attach(trainer)
    evaluation_loop(callback, model, state, batches, with_labels=False)
    callback.on_evaluate(None, state, None)
    assert_same_metrics(callback.history[0], {"step": 7, **expected_row(model, batches)})


def test_callback_ignores_an_attention_mask_of_another_shape(seed):
    """Without labels, next tokens come from input_ids and the attention mask; a mask that
    does not match input_ids (one that also covers cached past tokens) is not used."""
    model = Tiny(seed)
    (batch,) = batches_of(seed, sizes=(4,))
    ids = batch["input_ids"].clamp(min=1)  # no padding: the mask would only add past tokens
    trainer, state = stand_ins(model)
    callback = NeuralCollapseCallback().attach(trainer)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones(4, SEQ + 2, dtype=torch.long))
    callback.on_prediction_step(None, state, None)
    callback.on_evaluate(None, state, None)
    full = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    assert_same_metrics(callback.history[0], {"step": 7, **expected_row(model, full)})


def _evaluate_a_share(rank: int, world: int, port: int, seed: int, out: str) -> None:
    """One rank of a distributed evaluation: the callback sees this rank's batch only."""
    with gloo_group(rank, world, port):
        model = Tiny(seed)
        trainer, state = stand_ins(model)
        callback = NeuralCollapseCallback().attach(trainer)
        evaluation_loop(callback, model, state, batches_of(seed)[rank : rank + 1])
        callback.on_evaluate(None, state, None)
        torch.save(callback.history[0], f"{out}/rank{rank}.pt")


def test_gloo_callback_reports_every_ranks_tokens(tmp_path, seed):
    """Under torch.distributed (two gloo ranks, one batch each) every rank logs the metrics of
    all ranks' tokens: those of one process that saw both batches."""
    mp.spawn(_evaluate_a_share, args=(2, free_port(), seed, str(tmp_path)), nprocs=2, join=True)
    model = Tiny(seed)
    batches = batches_of(seed)
    expected = {"step": 7, **expected_row(model, batches)}
    # The ranks' float64 sums are added in another order than one process's: the metrics agree
    # to the relative bound N·eps·κ of the features (tests/helpers/tolerances.py).
    with torch.no_grad():
        hidden = [torch.tanh(model.embed(b["input_ids"])) for b in batches]
    labels = [next_token_labels(b["input_ids"], b["attention_mask"], -100) for b in batches]
    kept = [lab >= 0 for lab in labels]
    features = torch.cat([h[k] for h, k in zip(hidden, kept, strict=True)])
    classes = torch.cat([lab[k] for lab, k in zip(labels, kept, strict=True)])
    rtol = oracle_rtol(features, classes, VOCAB)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert_same_metrics(got, expected, rtol=rtol)


def test_callback_evaluation_before_any_model_logs_nothing(seed):
    """A callback the Trainer has not yet given a model (no hook, nothing measured) lets an
    evaluation pass: no row, nothing logged, no error."""
    callback = NeuralCollapseCallback()
    _, state = stand_ins(None)
    callback.on_prediction_step(None, state, None)
    callback.on_evaluate(None, state, None, metrics={"eval_runtime": 1.0})
    assert callback.history == [] and state.log_history == []


def test_callback_evaluation_of_one_next_token_class_is_a_nan_row(seed):
    """An evaluation whose next tokens are all one class (a short eval set, a constant
    sequence) has no Neural Collapse metrics: a NaN row with the reason, not an error that
    would stop the Trainer at its evaluation."""
    model = Tiny(seed)
    trainer, state = stand_ins(model)
    callback = NeuralCollapseCallback().attach(trainer)
    ids = torch.full((2, SEQ), 3)
    evaluation_loop(callback, model, state, [{"input_ids": ids, "attention_mask": ids * 0 + 1}])
    with pytest.warns(RuntimeWarning, match=r"logged as NaN: 1 of \d+ classes had samples"):
        callback.on_evaluate(None, state, None)
    (row,) = callback.history
    assert row["nc_undefined"] == (
        f"1 of {VOCAB} classes had samples (at least two are needed; {2 * (SEQ - 1)} samples)"
    )
    assert math.isnan(row["nc1"]) and row["num_tokens"] == 2 * (SEQ - 1)
    (logged,) = trainer.logs
    assert math.isnan(logged["eval_nc/nc1"]) and "eval_nc/nc_undefined" not in logged


def test_callback_hooks_close_and_bad_models(seed):
    model, other = gpt2(seed), gpt2(seed + 1)
    batches = batches_of(seed)
    trainer, state = stand_ins(model)
    callback = NeuralCollapseCallback().attach(trainer)
    callback.on_init_end(None, state, None, model=None)  # no model: nothing changes
    evaluation_loop(callback, model, state, batches[:1])
    callback.on_train_begin(None, state, None, model=model)  # the same model: kept, measuring
    evaluation_loop(callback, model, state, batches[1:])
    callback.on_evaluate(None, state, None)
    assert_same_metrics(callback.history[0], {"step": 7, **expected_row(model, batches)})
    # A new model: the hooks move to it.
    callback.on_train_begin(None, state, None, model=other)
    assert not model._forward_pre_hooks and not model.get_output_embeddings()._forward_pre_hooks
    evaluation_loop(callback, model, state, batches)
    callback.on_evaluate(None, state, None)
    assert len(callback.history) == 1
    evaluation_loop(callback, other, state, batches)
    callback.on_evaluate(None, state, None)
    assert_same_metrics(callback.history[1], {"step": 7, **expected_row(other, batches)})
    callback.close()
    assert not other._forward_pre_hooks and not other.get_output_embeddings()._forward_pre_hooks
    evaluation_loop(callback, other, state, batches)
    callback.on_evaluate(None, state, None)
    assert len(callback.history) == 2
    with pytest.raises(ValueError, match=r"NeuralCollapseCallback: weight_decay .* got -1"):
        NeuralCollapseCallback(weight_decay=-1.0)
    bad, _ = stand_ins(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UnsupportedModelError, match="NeuralCollapseCallback: model Sequential"):
        NeuralCollapseCallback().attach(bad)
