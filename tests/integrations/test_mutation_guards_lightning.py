"""Guards of ncfast.integrations.lightning against small mutants: every argument check (the
error type and the argument it names, and the boundary values accepted), the defaults, the
settings handed to NCMonitor at ``setup``, the epochs measured (every, a list, a function; the
sanity check and a given loader skip validation), the one validation dataloader measured among
several, the labels of tuple/list/dict batches, the hook attached only during a pass and
removed at its end, on an exception and at teardown, the record (history, metrics) and the
one ``log_dict`` call per measurement (keys, float64 values, options), an over-budget NC4 and
undefined metrics (NaN with a warning), the given loader measured at the chosen training
epochs on this rank's share, the training windows of ``online_every`` (steps, fractional
epochs, rows, logs) and the Lightning hint silenced for the callback's keys only.

The hooks are called directly with a stand-in trainer (``SimpleNamespace``) and a tiny float64
module whose ``log_dict`` binds its arguments as Lightning's does; one small real Lightning fit
checks the wiring. Values are compared with NCMonitor on the same batches (bit for bit: the
same features fed in the same order) and once with tests/helpers/oracle.py within
:func:`oracle_rtol` (N·eps·κ). The whole file runs in a few seconds."""

from __future__ import annotations

import inspect
import math
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")
from ncfast.integrations.lightning import NeuralCollapseCallback, _RankShare  # noqa: E402
from ncfast.measure import scalars  # noqa: E402
from ncfast.monitor import NCMonitor  # noqa: E402
from ncfast.nc4 import DEFAULT_MEMORY_BUDGET  # noqa: E402
from ncfast.stats import InvalidInputError  # noqa: E402
from tests.helpers import oracle  # noqa: E402
from tests.helpers.assertions import assert_matches_oracle, assert_same_metrics  # noqa: E402
from tests.helpers.synthetic_features import F64, make_data  # noqa: E402
from tests.helpers.tolerances import oracle_rtol  # noqa: E402

C, P = 3, 4
COUNTS = [6, 5, 4]  # 15 samples: batches of 4, 4, 4, 3
LAMBDA = 0.01
LOG_DICT = inspect.signature(L.LightningModule.log_dict)


def log_options(**given) -> dict:
    """The arguments of a ``log_dict`` call as Lightning binds them, defaults filled in."""
    bound = LOG_DICT.bind(None, {}, **given)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in ("self", "dictionary")}


EPOCH_LOG = log_options(
    on_step=False, on_epoch=True, sync_dist=False, batch_size=1, add_dataloader_idx=False
)
STEP_LOG = log_options(on_step=True, on_epoch=False, sync_dist=False, batch_size=1)


class Tiny(nn.Module):
    """``body`` (the identity, exactly) → ×0.5 → ``classifier``, float64: the penultimate
    features are the inputs and the classifier's input is half of them (both exact). Records
    each ``log_dict`` call as ``(values, options)``."""

    def __init__(self, weight, bias):
        super().__init__()
        self.body = nn.Linear(P, P, dtype=F64)
        self.classifier = nn.Linear(P, C, dtype=F64)
        with torch.no_grad():
            self.body.weight.copy_(torch.eye(P, dtype=F64))
            self.body.bias.zero_()
            self.classifier.weight.copy_(weight)
            self.classifier.bias.copy_(bias)
        self.logged: list[tuple[dict, dict]] = []

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    def forward(self, x):
        return self.classifier(0.5 * self.body(x))

    def log_dict(self, dictionary, **options):
        self.logged.append((dict(dictionary), log_options(**options)))


def setup(seed, counts=COUNTS, **options):
    """(callback set up on a Tiny model, the model, batches of 4 of its data)."""
    features, labels, weight, bias = make_data(counts, P, seed)
    model = Tiny(weight, bias)
    callback = NeuralCollapseCallback(**options)
    callback.setup(None, model, "fit")
    return callback, model, batches_of(features, labels)


def batches_of(features, labels, size=4):
    return [(features[i : i + size], labels[i : i + size]) for i in range(0, len(labels), size)]


def stand_in(epoch=0, **fields):
    defaults = dict(global_step=0, global_rank=0, world_size=1, num_training_batches=4)
    return SimpleNamespace(
        **{"sanity_checking": False, "current_epoch": epoch, **defaults, **fields}
    )


def validate(callback, model, loaders, epoch=0, sanity=False, check_hook=None):
    """One validation epoch as Lightning runs it: ``dataloader_idx`` is passed only when there
    are several loaders. ``check_hook(idx)`` runs before each forward pass."""
    trainer = stand_in(epoch, sanity_checking=sanity)
    model.eval()
    callback.on_validation_epoch_start(trainer, model)
    for idx, loader in enumerate(loaders):
        for i, batch in enumerate(loader):
            if len(loaders) > 1:
                callback.on_validation_batch_start(trainer, model, batch, i, idx)
            else:
                callback.on_validation_batch_start(trainer, model, batch, i)
            if check_hook is not None:
                check_hook(idx)
            with torch.no_grad():
                model(batch[0])
    callback.on_validation_epoch_end(trainer, model)


def hooks(model) -> int:
    return len(model.classifier._forward_pre_hooks) + len(model.body._forward_hooks)


def assert_logged(logged, result, prefix, options):
    """One call: the float64 tensors of ``scalars(result, prefix)`` (NaN where NaN)."""
    values, given = logged
    assert given == options
    want = scalars(result, prefix)
    assert set(values) == set(want)
    for key, value in values.items():
        assert value.dtype == F64 and value.device == torch.device("cpu"), key
        got = value.item()
        assert got == want[key] or (math.isnan(got) and math.isnan(want[key])), key


# ---------------------------------------------------------------- arguments and defaults
def test_bad_arguments_name_themselves_and_boundaries_pass():
    def bad(kind, match, *args, **kwargs):
        with pytest.raises(kind, match=match) as info:
            NeuralCollapseCallback(*args, **kwargs)
        return info.value

    bad(TypeError, r"^NeuralCollapseCallback: classifier must be an nn.Linear .* got int$", 3)
    bad(TypeError, r"^NeuralCollapseCallback: penultimate must be .* got int$", penultimate=3)
    error = bad(
        TypeError, r"^NeuralCollapseCallback: epochs must be None, a function", epochs=["a"]
    )
    assert error.__cause__ is None and error.__suppress_context__
    bad(TypeError, "epochs must be None", epochs=5)  # not iterable
    bad(ValueError, r"NeuralCollapseCallback: epochs must be an integer ≥ 0", epochs=[1, -1])
    bad(TypeError, r"^NeuralCollapseCallback: labels must be a function", labels="y")
    bad(TypeError, r"^NeuralCollapseCallback: prefix must be a string, got int$", prefix=3)
    bad(ValueError, r"NeuralCollapseCallback: dataloader_idx must .* ≥ 0", dataloader_idx=-1)
    bad(ValueError, r"NeuralCollapseCallback: weight_decay", weight_decay=-0.5)
    bad(ValueError, r"NeuralCollapseCallback: memory_budget_bytes .* ≥ 0", memory_budget_bytes=-1)
    bad(ValueError, r"NeuralCollapseCallback: online_every must .* ≥ 0", online_every=-1)
    bad(TypeError, r"NeuralCollapseCallback: online_every must be an integer", online_every=1.5)
    # The least values, and objects in place of attribute paths.
    layer, body = nn.Linear(2, 2), nn.Identity()
    callback = NeuralCollapseCallback(
        layer,
        body,
        epochs=[0],
        dataloader_idx=0,
        memory_budget_bytes=0,
        online_every=0,
        weight_decay=0.0,
        prefix="",
        labels=len,
    )
    assert callback.classifier is layer and callback.penultimate is body
    assert (callback.dataloader_idx, callback.memory_budget_bytes, callback.online_every) == (
        0,
        0,
        0,
    )
    assert callback.prefix == "" and callback.labels is len
    NeuralCollapseCallback(penultimate="body", epochs=(e for e in (0, 3)))


def test_defaults(seed):
    callback = NeuralCollapseCallback()
    assert callback.classifier == "classifier" and callback.penultimate is None
    assert callback.dataloader is None and callback.dataloader_idx == 0
    assert callback.weight_decay == 0.0 and callback.prefix == "nc/"
    assert callback.memory_budget_bytes == DEFAULT_MEMORY_BUDGET
    assert callback.on_invalid == "raise" and callback.online_every == 0
    assert callback.history == [] and callback.online_history == [] and callback.metrics is None
    assert callback.monitor is None and callback.watch is None
    assert all(callback._wants(e) for e in range(5))
    x, y = torch.zeros(2, 1), torch.tensor([1, 0])
    assert callback.labels((x, y)) is y and callback.labels({"labels": y, "x": x}) is y
    # At setup: the monitor of the model's classifier, with these settings.
    callback, model, _ = setup(seed)
    monitor = callback.monitor
    assert monitor.model is model and monitor.classifier is model.classifier
    assert monitor.penultimate is None and monitor.weight_decay == 0.0
    assert monitor.on_invalid == "raise" and monitor.on_degenerate == "nan"
    assert monitor.memory_budget_bytes == DEFAULT_MEMORY_BUDGET
    callback.on_train_start(stand_in(), model)  # online_every off: no watch
    assert callback.watch is None and hooks(model) == 0


def test_second_item_of_tuples_lists_and_dicts():
    labels_of = NeuralCollapseCallback().labels
    x, y = torch.zeros(2, 1), torch.tensor([1, 0])
    assert labels_of((x, y)) is y and labels_of([x, y, "extra"]) is y
    assert labels_of({"labels": y}) is y and labels_of({"x": x, "labels": y}) is y
    for batch, kind in (((x,), "tuple"), ({"x": x, "y": y}, "dict"), (x, "Tensor"), ([], "list")):
        with pytest.raises(TypeError, match=rf"cannot find the labels of a batch of type {kind};"):
            labels_of(batch)


def test_chosen_epochs():
    assert [NeuralCollapseCallback(epochs=[0, 2])._wants(e) for e in range(4)] == [
        True,
        False,
        True,
        False,
    ]
    odd = NeuralCollapseCallback(epochs=lambda e: e % 2)  # an int: taken as a bool
    assert [odd._wants(e) for e in range(4)] == [False, True, False, True]
    assert odd._wants(1) is True
    once = NeuralCollapseCallback(epochs=iter([1]))  # an iterator is read once, kept
    assert [once._wants(e) for e in range(3)] == [False, True, False]
    assert [once._wants(e) for e in range(3)] == [False, True, False]


# -------------------------------------------------------------------------------- setup
def test_setup_resolves_the_layers_and_hands_on_the_settings(seed):
    callback, model, _ = setup(
        seed,
        penultimate="body",
        weight_decay=LAMBDA,
        on_invalid="skip",
        memory_budget_bytes=123,
    )
    monitor = callback.monitor
    assert monitor.classifier is model.classifier and monitor.penultimate is model.body
    assert monitor.weight_decay == LAMBDA and monitor.on_invalid == "skip"
    assert monitor.memory_budget_bytes == 123 and monitor.on_degenerate == "nan"
    model2 = Tiny(model.classifier.weight, model.classifier.bias)
    by_object = NeuralCollapseCallback(model2.classifier, model2.body)
    by_object.setup(None, model2, "fit")
    assert by_object.monitor.classifier is model2.classifier
    assert by_object.monitor.penultimate is model2.body


def test_setup_errors_name_the_layer_and_the_submodules(seed):
    model = Tiny(torch.zeros(C, P, dtype=F64), torch.zeros(C, dtype=F64))

    def fails(kind, match, root=model, **options):
        with pytest.raises(kind, match=match) as info:
            NeuralCollapseCallback(**options).setup(None, root, "fit")
        assert info.value.__cause__ is None and info.value.__suppress_context__

    fails(
        ValueError,
        r"^NeuralCollapseCallback: classifier 'head' is not a submodule of Tiny "
        r"\(its submodules: body, classifier\)$",
        classifier="head",
    )
    fails(
        ValueError,
        r"^NeuralCollapseCallback: penultimate 'neck' is not a submodule of Tiny",
        penultimate="neck",
    )
    fails(ValueError, r"of Linear \(its submodules: none\)$", root=nn.Linear(2, 2), classifier="x")
    with pytest.raises(
        TypeError,
        match=r"^NeuralCollapseCallback: classifier '' of Tiny is a Tiny, not an nn.Linear$",
    ):
        NeuralCollapseCallback("").setup(None, model, "fit")


def test_setup_silences_the_sync_dist_hint_of_its_own_keys_only(seed):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup(seed, prefix="v.l/")
        for name in ("v.l/nc1", "vxl/nc1", "other/nc1"):
            warnings.warn(
                f"It is recommended to use `self.log({name!r}, ..., sync_dist=True)` when "
                "logging on epoch level",
                UserWarning,
                stacklevel=1,
            )
    assert [str(w.message).split("'")[1] for w in caught] == ["vxl/nc1", "other/nc1"]


# ------------------------------------------------------------------------- validation
def test_validation_is_measured_every_epoch_recorded_and_logged_once(seed):
    callback, model, batches = setup(seed, penultimate="body", weight_decay=LAMBDA)
    for epoch in (0, 1):
        validate(callback, model, [batches], epoch, check_hook=lambda idx: None)
        assert hooks(model) == 0 and callback.monitor.open_pass is None
        assert not callback._measuring
    expected = NCMonitor(model, model.classifier, model.body, weight_decay=LAMBDA).evaluate(batches)
    assert [row["epoch"] for row in callback.history] == [0, 1]
    assert_same_metrics(callback.metrics, expected)
    assert_same_metrics({k: v for k, v in callback.history[1].items() if k != "epoch"}, expected)
    assert callback.metrics["weight_decay"] == LAMBDA and callback.metrics["num_samples"] == 15
    assert len(model.logged) == 2
    for logged in model.logged:
        assert_logged(logged, expected, "nc/", EPOCH_LOG)
    # The penultimate features are the inputs: the brute force of them (N·eps·κ).
    features = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    want = oracle.nc_metrics(
        features.numpy(), labels.numpy(), C, weight.numpy(), bias.numpy(), LAMBDA
    )
    assert_matches_oracle(callback.metrics, want, oracle_rtol(features, labels, C, LAMBDA))


def test_the_classifier_input_is_the_default_feature(seed):
    """Without ``penultimate`` the features are the classifier's input (half the inputs)."""
    callback, model, batches = setup(seed, prefix="val/")
    validate(callback, model, [batches])
    assert_same_metrics(callback.metrics, NCMonitor(model, model.classifier).evaluate(batches))
    assert_logged(model.logged[0], callback.metrics, "val/", EPOCH_LOG)
    assert "loss_mse" in callback.metrics


def test_sanity_check_unchosen_epochs_and_a_given_loader_skip_validation(seed):
    callback, model, batches = setup(seed, epochs=[1])

    def no_hook(idx):
        assert hooks(model) == 0

    validate(callback, model, [batches], epoch=1, sanity=True, check_hook=no_hook)
    validate(callback, model, [batches], epoch=0, check_hook=no_hook)
    assert callback.history == [] and model.logged == []
    validate(callback, model, [batches], epoch=1)
    assert [row["epoch"] for row in callback.history] == [1]
    given, model, batches = setup(seed, dataloader=batches)
    validate(given, model, [batches], check_hook=no_hook)
    assert given.history == [] and model.logged == []


@pytest.mark.parametrize("chosen", [0, 1])
def test_only_the_chosen_validation_dataloader_is_measured(seed, chosen):
    callback, model, batches = setup(seed, dataloader_idx=chosen)
    features, labels, _, _ = make_data([3, 4, 5], P, seed + 1)
    loaders = [batches, batches_of(features, labels, 5)]

    def hook_only_on_chosen(idx):
        assert hooks(model) == (idx == chosen)

    validate(callback, model, loaders, check_hook=hook_only_on_chosen)
    expected = NCMonitor(model, model.classifier).evaluate(loaders[chosen])
    assert_same_metrics(callback.metrics, expected)
    assert len(model.logged) == 1 and hooks(model) == 0


def test_an_epoch_without_batches_of_the_chosen_loader_records_nothing(seed):
    callback, model, batches = setup(seed)
    validate(callback, model, [[], batches], epoch=0)  # the very first epoch: nothing to record
    assert callback.history == [] and len(model.logged) == 0
    validate(callback, model, [batches], epoch=0)
    validate(callback, model, [[], batches], epoch=1)  # loader 0 is empty this time
    assert [row["epoch"] for row in callback.history] == [0] and len(model.logged) == 1
    validate(callback, model, [batches], epoch=2)  # a fresh pass each epoch
    assert [row["epoch"] for row in callback.history] == [0, 2] and len(model.logged) == 2


def test_a_labels_function_reads_dict_batches(seed):
    callback, model, batches = setup(seed, labels=lambda batch: batch["target"])
    dicts = [{"target": y, "x": x} for x, y in batches]
    trainer = stand_in()
    model.eval()
    callback.on_validation_epoch_start(trainer, model)
    for i, batch in enumerate(dicts):
        callback.on_validation_batch_start(trainer, model, batch, i)
        model(batch["x"])
    callback.on_validation_epoch_end(trainer, model)
    assert_same_metrics(callback.metrics, NCMonitor(model, model.classifier).evaluate(batches))


def assert_points_here(record, line: int | None = None) -> None:
    """The callback's warnings point at the first line outside ncfast and Lightning: here (at
    ``line`` when given), where a warnings filter on the user's module catches them."""
    (warning,) = [w for w in record if issubclass(w.category, RuntimeWarning)]
    if "MUTANT_UNDER_TEST" in os.environ:
        # Under mutmut a trampoline frame (outside both packages) sits below the callback's
        # methods, so the warning points at it; the file and line are checked without.
        assert Path(warning.filename).name == "trampoline.py"
        return
    assert warning.filename == __file__
    assert line is None or warning.lineno == line


def test_over_the_budget_nc4_is_nan_with_a_warning(seed):
    callback, model, batches = setup(seed, memory_budget_bytes=64, weight_decay=LAMBDA)
    with pytest.warns(RuntimeWarning) as w:
        validate(callback, model, [batches])
    assert_points_here(w)
    (warning,) = [r for r in w if issubclass(r.category, RuntimeWarning)]
    assert str(warning.message) == (
        "NeuralCollapseCallback: the validation features exceeded memory_budget_bytes=64, so "
        "nc4_ncc_mismatch is NaN; raise the budget or pass dataloader= (which can run a second "
        "pass)"
    )
    monitor = NCMonitor(model, model.classifier, weight_decay=LAMBDA, memory_budget_bytes=64)
    with torch.no_grad(), monitor.measure() as nc:
        for x, y in batches:
            nc.labels(y)
            model(x)
    expected = {**nc.compute(nc4=False), "nc4_ncc_mismatch": math.nan}
    assert_same_metrics(callback.metrics, expected)
    assert len(model.logged) == 1 and hooks(model) == 0


def test_undefined_metrics_are_logged_as_nan_with_the_reason(seed):
    callback, model, batches = setup(seed, counts=[0, 7, 0])
    with pytest.warns(
        RuntimeWarning, match=r"metrics undefined at epoch 3, logged as NaN: .*1 of"
    ) as w:
        validate(callback, model, [batches], epoch=3)
    assert_points_here(w)
    assert math.isnan(callback.metrics["nc1"]) and "1 of 3" in callback.metrics["nc_undefined"]
    assert callback.history[0]["epoch"] == 3 and callback.history[0]["nc_undefined"]
    assert_logged(model.logged[0], callback.metrics, "nc/", EPOCH_LOG)


def test_invalid_labels_raise_with_the_callbacks_advice_or_are_skipped(seed):
    callback, model, batches = setup(seed)
    bad = [(x, torch.where(y == 0, torch.full_like(y, C), y)) for x, y in batches]
    with pytest.raises(
        InvalidInputError,
        match=r"or pass NeuralCollapseCallback\(\.\.\., on_invalid='skip'\) to skip and count "
        r"them \(see callback\.monitor\.last_pass\.measurement\.stats\.skipped\)",
    ):
        validate(callback, model, [bad])
    callback.on_exception(None, model, None)
    assert hooks(model) == 0 and callback.monitor.open_pass is None
    skipping, model, _ = setup(seed, on_invalid="skip")
    validate(skipping, model, [bad])
    assert skipping.metrics["num_samples"] == 15 - COUNTS[0]


def test_exception_and_teardown_remove_the_hook_and_release_the_pass(seed):
    callback, model, batches = setup(seed, online_every=2)
    trainer = stand_in()
    for end in ("on_exception", "teardown"):
        callback.on_train_start(trainer, model)
        model.eval()
        callback.on_validation_epoch_start(trainer, model)
        callback.on_validation_batch_start(trainer, model, batches[0], 0)
        assert hooks(model) == 2  # the pass's and the watch's
        if end == "on_exception":
            callback.on_exception(trainer, model, RuntimeError("stop"))
        else:
            callback.teardown(trainer, model, "fit")
            assert callback._pass is None  # its statistics are not kept
        assert hooks(model) == 0 and callback.watch is None
        assert callback.monitor.open_pass is None  # a new pass may open
        callback.on_train_batch_start(trainer, model, batches[0], 0)  # no watch: nothing
    callback.teardown(trainer, model, "fit")  # nothing open: nothing to do


# -------------------------------------------------------------------- a given loader
def test_a_given_loader_is_measured_on_this_ranks_share_at_chosen_epochs(seed):
    features, labels, _, _ = make_data([8, 7, 6], P, seed)
    loader = batches_of(features, labels, 3)  # 7 batches
    callback, model, _ = setup(
        seed, dataloader=loader, epochs=[1], memory_budget_bytes=64, weight_decay=LAMBDA
    )
    model.train()
    callback.on_train_epoch_end(stand_in(0, global_rank=1, world_size=2), model)
    assert callback.history == []
    callback.on_train_epoch_end(stand_in(1, global_rank=1, world_size=2), model)
    share = loader[1::2]
    # Over the budget: NC4 from a second pass over the same share (re-iterated).
    expected = NCMonitor(model, model.classifier, weight_decay=LAMBDA).evaluate(share)
    assert not math.isnan(expected["nc4_ncc_mismatch"])
    assert_same_metrics(callback.metrics, expected)
    assert callback.metrics["num_samples"] == 9 and model.training
    assert [row["epoch"] for row in callback.history] == [1]
    assert len(model.logged) == 1
    assert_logged(model.logged[0], expected, "nc/", EPOCH_LOG)
    callback.on_train_epoch_end(stand_in(1, global_rank=0, world_size=1), model)
    whole = NCMonitor(model, model.classifier, weight_decay=LAMBDA).evaluate(loader)
    assert_same_metrics(callback.metrics, whole)
    assert callback.metrics["num_samples"] == 21 and hooks(model) == 0
    plain, model, _ = setup(seed)
    plain.on_train_epoch_end(stand_in(), model)  # no loader given: nothing
    assert plain.history == [] and model.logged == []


def test_rank_share_deals_out_the_batches():
    shares = [list(_RankShare(range(7), rank, 3)) for rank in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    share = _RankShare(range(5), 1, 2)
    assert list(share) == list(share) == [1, 3]  # re-iterable
    assert list(_RankShare(range(3), 0, 1)) == [0, 1, 2]
    data = TensorDataset(torch.arange(6.0))
    with pytest.raises(ValueError, match=r"dataloader shuffles \(RandomSampler\).*shuffle=False"):
        _RankShare(DataLoader(data, shuffle=True), 0, 2)
    assert len(list(_RankShare(DataLoader(data, shuffle=True), 0, 1))) == 6  # one rank
    assert len(list(_RankShare(DataLoader(data, batch_size=2), 1, 2))) == 1


# ---------------------------------------------------------------- the training passes
def train_epoch(callback, model, trainer, batches):
    """One training epoch as Lightning runs the hooks (the optimiser step left out)."""
    model.train()
    for i, batch in enumerate(batches):
        callback.on_train_batch_start(trainer, model, batch, i)
        with torch.no_grad():
            model(batch[0])
        callback.on_train_batch_end(trainer, model, None, batch, i)
        trainer.global_step += 1


def test_online_windows_give_rows_and_step_logs(seed):
    """Windows of one epoch of fixed weights: each row is NCMonitor.evaluate of the epoch's
    batches (the same features in the same order), NC4 from the second window on (against the
    first window's means: the same)."""
    callback, model, batches = setup(seed, online_every=4, weight_decay=LAMBDA, prefix="m/")
    trainer = stand_in()
    callback.on_train_start(trainer, model)
    assert hooks(model) == 1
    for epoch in (0, 1):
        trainer.current_epoch = epoch
        train_epoch(callback, model, trainer, batches)
    expected = NCMonitor(model, model.classifier, weight_decay=LAMBDA).evaluate(batches)
    rows = callback.online_history
    assert [(r["step"], r["epoch"], r["window_steps"]) for r in rows] == [(4, 1.0, 4), (8, 2.0, 4)]
    counters = ("step", "epoch", "window_steps")
    first, second = ({k: v for k, v in r.items() if k not in counters} for r in rows)
    assert_same_metrics(first, {k: v for k, v in expected.items() if k != "nc4_ncc_mismatch"})
    assert_same_metrics(second, expected)
    assert len(model.logged) == 2
    for logged, row in zip(model.logged, rows, strict=True):
        assert_logged(logged, row, "m/train_online/", STEP_LOG)
    assert callback.history == []
    callback.on_train_end(trainer, model)
    assert hooks(model) == 0 and callback.watch is None
    train_epoch(callback, model, trainer, batches)  # after the end: nothing watched
    assert len(rows) == 2


def test_online_windows_start_at_the_trainers_step_and_count_fractional_epochs(seed):
    callback, model, batches = setup(seed, online_every=3)
    trainer = stand_in(2, global_step=5)
    callback.on_train_start(trainer, model)
    callback.on_train_start(trainer, model)  # a second start replaces the watch
    assert hooks(model) == 1
    train_epoch(callback, model, trainer, batches[:1])  # step 6 ends a window of one step
    assert [(r["step"], r["window_steps"], r["epoch"]) for r in callback.online_history] == [
        (6, 1, 2.25)
    ]
    for batches_per_epoch, epoch in ((math.inf, None), (4.0, 2.75)):
        trainer.num_training_batches = batches_per_epoch
        train_epoch(callback, model, trainer, [batches[0], batches[1], batches[2]])
        row = callback.online_history[-1]
        assert row["step"] == trainer.global_step and row.get("epoch") == epoch
    assert len(callback.online_history) == len(model.logged) == 3
    callback.teardown(trainer, model, "fit")
    assert hooks(model) == 0


def test_an_undefined_online_window_warns_and_logs_nan(seed):
    callback, model, batches = setup(seed, counts=[0, 7, 0], online_every=2)
    trainer = stand_in()
    callback.on_train_start(trainer, model)
    with pytest.warns(
        RuntimeWarning, match=r"training passes undefined at step 2, logged as NaN"
    ) as w:
        train_epoch(callback, model, trainer, batches[:2])
    assert_points_here(w)
    row = callback.online_history[0]
    assert math.isnan(row["nc1"]) and "1 of 3" in row["nc_undefined"]
    assert_logged(model.logged[0], row, "nc/train_online/", STEP_LOG)


# ------------------------------------------------------------------- a real fit
def test_a_lightning_fit_measures_validation_and_the_training_windows(seed):
    """2 epochs of 3 training batches: validation measured at epochs 0 and 1 (not in the
    sanity check) as NCMonitor measures the trained model, one window per epoch, every value
    in the trainer's callback_metrics, no hook left."""
    pytest.importorskip("sklearn")  # tests/helpers/lightning_example loads the example's data
    from tests.helpers.lightning_example import trainer

    class TinyModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.body, self.classifier = nn.Linear(P, 6), nn.Linear(6, C)

        def forward(self, x):
            return self.classifier(torch.tanh(self.body(x)))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(seed, verbose=False)
    features, labels, _, _ = make_data([8, 8, 8], P, seed)
    data = TensorDataset(features / features.norm(dim=1).max(), labels)
    callback = NeuralCollapseCallback(online_every=3)
    model = TinyModule()
    fit = trainer([callback], 2)
    fit.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    assert [row["epoch"] for row in callback.history] == [0, 1]
    expected = NCMonitor(model, model.classifier).evaluate(DataLoader(data, batch_size=8))
    assert_same_metrics(callback.metrics, expected)
    assert [(r["step"], r["epoch"]) for r in callback.online_history] == [(3, 1.0), (6, 2.0)]
    logged = {k: float(v) for k, v in fit.callback_metrics.items() if k.startswith("nc/")}
    want = scalars(expected, "nc/") | scalars(callback.online_history[-1], "nc/train_online/")
    assert logged == want
    assert hooks(model) == 0 and callback.watch is None


def test_a_warning_in_a_lightning_fit_points_at_the_fit_call(seed):
    """Past the NC4 budget in a real fit, the warning points at the ``fit`` line (not at
    Lightning's loops, which call the hooks)."""
    pytest.importorskip("sklearn")  # tests/helpers/lightning_example loads the example's data
    from tests.helpers.lightning_example import trainer

    class TinyModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Linear(P, C)

        def forward(self, x):
            return self.classifier(x)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(seed, verbose=False)
    features, labels, _, _ = make_data([4, 4, 4], P, seed)
    data = DataLoader(TensorDataset(features, labels), batch_size=6)
    fit = trainer([NeuralCollapseCallback(memory_budget_bytes=0)], 1)
    with pytest.warns(RuntimeWarning, match="exceeded memory_budget_bytes=0") as w:
        line = inspect.currentframe().f_lineno + 1
        fit.fit(TinyModule(), data, data)
    assert_points_here(w, line)


def test_logged_values_are_tensors_on_the_modules_device(seed, monkeypatch):
    """Lightning logs tensors on the module's device: the validation and the online values
    are made there (the meta device stands in for a GPU: the model itself stays on the CPU)."""
    monkeypatch.setattr(Tiny, "device", property(lambda self: torch.device("meta")))
    callback, model, batches = setup(seed, online_every=4)
    validate(callback, model, [batches], epoch=0)
    trainer = stand_in()
    callback.on_train_start(trainer, model)
    train_epoch(callback, model, trainer, batches)
    callback.on_train_end(trainer, model)
    assert [options for _, options in model.logged] == [EPOCH_LOG, STEP_LOG]
    for values, _ in model.logged:
        assert values and {(v.device.type, v.dtype) for v in values.values()} == {("meta", F64)}
