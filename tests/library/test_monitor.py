"""NCMonitor: forward hooks on users' models give exactly what feeding ncfast.Measurement directly
gives; bad use is a clear error; TensorBoard logging writes every scalar."""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import ncfast
from ncfast.integrations.tensorboard import TensorBoardWriter, log_to_tensorboard
from ncfast.monitor import NCMonitor
from ncfast.stats import InvalidInputError
from tests.helpers.assertions import assert_same_metrics, assert_same_stats
from tests.helpers.feeding import fed
from tests.helpers.process_group import free_port, gloo_group
from tests.helpers.tolerances import oracle_rtol

F64 = torch.float64


def mlp(seed: int, classes: int = 5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, classes)
    ).to(F64)


def data(seed: int, n: int = 150, classes: int = 5, dim: int = 10):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    centers = torch.randn(classes, dim, generator=g, dtype=F64) * 2
    return centers[labels] + torch.randn(n, dim, generator=g, dtype=F64), labels


def batches(x, y, sizes=(17, 1, 40, 33)):
    out, start, k = [], 0, 0
    while start < len(y):
        stop = min(len(y), start + sizes[k % len(sizes)])
        out.append((x[start:stop], y[start:stop]))
        start, k = stop, k + 1
    return out


def direct(features, labels, classifier, weight_decay=0.0, sizes=(17, 1, 40, 33), **kwargs):
    """Measurement fed with the features computed without any hook."""
    m = ncfast.Measurement(
        classifier.out_features,
        classifier.in_features,
        weight=classifier.weight.detach(),
        bias=classifier.bias.detach(),
        weight_decay=weight_decay,
        **kwargs,
    )
    for h, y in batches(features, labels, sizes):
        m.update(h, y)
    return m.compute()


def run_pass(monitor, model, x, y, sizes=(17, 1, 40, 33)):
    with torch.no_grad(), monitor.measure() as nc:
        for xb, yb in batches(x, y, sizes):
            nc.labels(yb)
            model(xb)
    return nc


@pytest.mark.parametrize("hook_at", ["penultimate", "classifier_input"])
def test_sequential_matches_direct_measurement(hook_at, seed):
    model, (x, y) = mlp(seed), data(seed)
    penultimate = model[3] if hook_at == "penultimate" else None
    monitor = NCMonitor(model, classifier=model[4], penultimate=penultimate, weight_decay=0.3)
    nc = run_pass(monitor, model, x, y)
    with torch.no_grad():
        features = model[:4](x)
    expected = direct(features, y, model[4], weight_decay=0.3)
    assert "nc4_ncc_mismatch" in expected and "loss_ls_perp" in expected
    assert nc.batches == len(batches(x, y))
    assert_same_metrics(nc.metrics, expected, rtol=oracle_rtol(features, y, 5))
    assert not model[4]._forward_pre_hooks and not model[3]._forward_hooks  # hook removed


def _resnet_features(model, x):
    """torchvision ResNet's forward up to the flattened average pool, written out by hand."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)


def test_torchvision_resnet_hooked_at_avgpool_matches_direct_measurement(seed):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=6).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 3, 16, 16, generator=g)
    y = torch.arange(48) % 6
    monitor = NCMonitor(model, classifier=model.fc, penultimate=model.avgpool)
    nc = run_pass(monitor, model, x, y, sizes=(20, 28))
    with torch.no_grad():
        features = _resnet_features(model, x)
    assert_same_metrics(nc.metrics, direct(features, y, model.fc, sizes=(20, 28)))
    assert nc.metrics["classes_present"] == 6 and nc.metrics["num_samples"] == 48


def test_evaluate_on_a_dataloader_restores_mode_and_matches_measure(seed):
    model, (x, y) = mlp(seed), data(seed)
    model.train()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    monitor = NCMonitor(model, classifier=model[4])
    got = monitor.evaluate(loader)
    assert model.training
    with torch.no_grad():
        features = model[:4](x)
    expected = direct(features, y, model[4], sizes=(32,))
    assert_same_metrics(got, expected, rtol=oracle_rtol(features, y, 5))


def test_nc4_second_pass_through_the_model_equals_buffered(seed):
    model, (x, y) = mlp(seed), data(seed)
    buffered = NCMonitor(model, classifier=model[4])
    expected = run_pass(buffered, model, x, y).metrics
    tight = NCMonitor(model, classifier=model[4], memory_budget_bytes=1000)
    nc = run_pass(tight, model, x, y)
    assert nc.needs_second_pass
    with pytest.raises(ValueError, match="second pass"):
        _ = nc.metrics
    loader = batches(x, y, (25,))
    with torch.no_grad():
        rtol = oracle_rtol(model[:4](x), y, 5)
    assert_same_metrics(nc.compute(second_pass=loader), expected, rtol)
    assert_same_metrics(tight.evaluate(loader), expected, rtol)
    assert not model[4]._forward_pre_hooks
    with pytest.raises(ValueError, match="second pass yielded no batches"):
        tight.evaluate(iter(loader))  # a one-shot iterator is used up by the first pass


def test_sequence_model_counts_every_position_as_a_sample(seed):
    """Classifier input [B, T, P] with labels [B, T] (a token classifier)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 7, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (9, 7), generator=g)
    monitor = NCMonitor(model, classifier=model[2])
    with torch.no_grad(), monitor.measure() as nc:
        for xb, yb in zip(x.split(4), y.split(4), strict=True):
            nc.labels(yb)
            model(xb)
    with torch.no_grad():
        features = model[:2](x)
    m = ncfast.Measurement(3, 6, model[2].weight.detach(), model[2].bias.detach())
    for hb, yb in zip(features.split(4), y.split(4), strict=True):
        m.update(hb.reshape(-1, 6), yb.reshape(-1))
    assert_same_metrics(nc.metrics, m.compute())
    assert nc.metrics["num_samples"] == 63


def test_labels_as_lists_are_accepted(seed):
    model, (x, y) = mlp(seed), data(seed, n=60)
    monitor = NCMonitor(model, classifier=model[4])
    with torch.no_grad(), monitor.measure() as nc:
        for xb, yb in batches(x, y, (30,)):
            nc.labels(yb.tolist())
            model(xb)
    with torch.no_grad():
        features = model[:4](x)
    expected = direct(features, y, model[4], sizes=(30,))
    assert_same_metrics(nc.metrics, expected, rtol=oracle_rtol(features, y, 5))


# --------------------------------------------------------------------------- bad use
def test_constructor_rejects_bad_modules_and_settings():
    model = mlp(0)
    other = mlp(1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        NCMonitor("model", classifier=model[4])
    with pytest.raises(TypeError, match="classifier must be the model's final nn.Linear"):
        NCMonitor(model, classifier=model[3])
    with pytest.raises(ValueError, match="classifier is not a submodule of model"):
        NCMonitor(model, classifier=other[4])
    with pytest.raises(ValueError, match="penultimate is not a submodule of model"):
        NCMonitor(model, classifier=model[4], penultimate=other[3])
    with pytest.raises(TypeError, match="penultimate must be an nn.Module"):
        NCMonitor(model, classifier=model[4], penultimate="avgpool")
    with pytest.raises(ValueError, match="penultimate is the model itself"):
        NCMonitor(model, classifier=model[4], penultimate=model)
    with pytest.raises(ValueError, match="weight_decay"):
        NCMonitor(model, classifier=model[4], weight_decay=-1.0)
    with pytest.raises(ValueError, match="on_invalid"):
        NCMonitor(model, classifier=model[4], on_invalid="ignore")
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        NCMonitor(model, classifier=model[4], memory_budget_bytes=-1)
    with pytest.raises(
        TypeError, match="NCMonitor: memory_budget_bytes must be an integer, got bool"
    ):
        NCMonitor(model, classifier=model[4], memory_budget_bytes=True)
    with pytest.raises(TypeError, match="distributed"):
        NCMonitor(model, classifier=model[4], distributed="yes")


def test_label_count_mismatch_names_both_sizes():
    model, (x, y) = mlp(0), data(0, n=20)
    monitor = NCMonitor(model, classifier=model[4])
    with pytest.raises(ValueError, match=r"labels of shape \[19\] for a batch of 20 samples"):
        with torch.no_grad(), monitor.measure() as nc:
            nc.labels(y[:19])
            model(x)
    assert not model[4]._forward_pre_hooks  # removed on error too
    with torch.no_grad(), monitor.measure() as nc:  # and the monitor is usable again
        nc.labels(y)
        model(x)
    assert nc.metrics["num_samples"] == 20


def test_forward_without_labels_and_labels_without_forward_are_errors():
    model, (x, y) = mlp(0), data(0, n=20)
    monitor = NCMonitor(model, classifier=model[4])
    with pytest.raises(RuntimeError, match="without labels"):
        with torch.no_grad(), monitor.measure():
            model(x)
    with pytest.raises(ValueError, match="labels of the previous call were never used"):
        with torch.no_grad(), monitor.measure() as nc:
            nc.labels(y)
            nc.labels(y)
    with pytest.raises(ValueError, match="no forward pass of the model followed"):
        with monitor.measure() as nc:
            nc.labels(y)
    nc = monitor.measure()
    with pytest.raises(RuntimeError, match="not open"):
        nc.labels(y)
    with pytest.raises(RuntimeError, match="has not ended"):
        _ = nc.metrics


def test_labels_must_be_integers_in_range():
    model, (x, y) = mlp(0), data(0, n=20)
    monitor = NCMonitor(model, classifier=model[4])
    with pytest.raises(TypeError, match="integer class indices"):
        with monitor.measure() as nc:
            nc.labels(y.double())
    with pytest.raises(TypeError, match="integer class indices"):
        with monitor.measure() as nc:
            nc.labels("cat")
    with pytest.raises(InvalidInputError, match="outside"):
        with torch.no_grad(), monitor.measure() as nc:
            nc.labels(y + 5)
            model(x)


def test_penultimate_of_the_wrong_width_or_type_is_named():
    model, (x, y) = mlp(0), data(0, n=20)
    monitor = NCMonitor(model, classifier=model[4], penultimate=model[1])
    with pytest.raises(ValueError, match="16 values per sample .* the classifier takes 8"):
        with torch.no_grad(), monitor.measure() as nc:
            nc.labels(y)
            model(x)

    class Pair(nn.Module):
        def forward(self, h):
            return h, h

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.pair, self.fc = nn.Linear(10, 8).double(), Pair(), nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.pair(self.body(x))[0].float())

    net = TwoHeads()
    with pytest.raises(TypeError, match="is a tuple, not a tensor"):
        with (
            torch.no_grad(),
            NCMonitor(net, classifier=net.fc, penultimate=net.pair).measure() as nc,
        ):
            nc.labels(y)
            net(x)


def test_nested_passes_and_a_changed_classifier_are_errors():
    model, (x, y) = mlp(0), data(0, n=20)
    monitor = NCMonitor(model, classifier=model[4])
    with pytest.raises(RuntimeError, match="already open"):
        with monitor.measure(), monitor.measure():
            pass
    with pytest.raises(RuntimeError, match="changed during the measurement"):
        with monitor.measure() as nc:
            nc.labels(y)
            model(x).square().mean().backward()
            torch.optim.SGD(model.parameters(), lr=0.1).step()
    # Writes through .data bypass torch's version counters; the digest of the values sees them
    # (issue 19 item 20): one weight, one bias entry, two rows swapped.
    edits = [
        lambda fc: fc.weight.data[0, 0].add_(1e-3),
        lambda fc: fc.bias.data.copy_(fc.bias.data + 1),
        lambda fc: fc.weight.data.copy_(fc.weight.data[[1, 0, *range(2, fc.out_features)]]),
    ]
    for edit in edits:
        with pytest.raises(RuntimeError, match="changed during the measurement.*\\.data"):
            with monitor.measure() as nc:
                nc.labels(y)
                model(x)
                edit(model[4])
    with monitor.measure() as nc:  # unchanged: measured
        nc.labels(y)
        model(x)
    assert nc.metrics["num_samples"] == 20


def test_open_and_close_without_a_with_block_equal_the_context_manager(seed):
    """What callbacks do: open() at the start of a pass, labels before each forward, close()
    at the end; the same metrics as the with block, bit for bit. cancel() drops a pass."""
    model, (x, y) = mlp(seed), data(seed)
    monitor = NCMonitor(model, classifier=model[4], weight_decay=0.1)
    expected = run_pass(monitor, model, x, y).metrics
    nc = monitor.measure().open()
    assert nc.is_open and model[4]._forward_pre_hooks
    with torch.no_grad():
        for xb, yb in batches(x, y):
            nc.labels(yb)
            model(xb)
    nc.close()
    assert not nc.is_open and not model[4]._forward_pre_hooks
    assert_same_metrics(nc.metrics, expected)
    with pytest.raises(RuntimeError, match="can be opened once"):
        nc.open()
    with pytest.raises(RuntimeError, match="not open"):
        nc.close()
    # An abandoned pass: the hook goes, nothing is computed, and a new pass can open.
    dropped = monitor.measure().open()
    dropped.labels(y[:5])
    dropped.cancel()
    assert not model[4]._forward_pre_hooks
    with pytest.raises(RuntimeError, match="not ended"):
        _ = dropped.metrics
    with pytest.raises(RuntimeError, match="not open"):
        dropped.labels(y[:5])
    assert_same_metrics(run_pass(monitor, model, x, y).metrics, expected)


def test_distributed_true_without_a_process_group_is_a_clear_error():
    model = mlp(0)
    with pytest.raises(RuntimeError, match="init_process_group"):
        with NCMonitor(model, classifier=model[4], distributed=True).measure():
            pass


def test_evaluate_rejects_batches_that_are_not_pairs():
    model, (x, y) = mlp(0), data(0, n=20)
    monitor = NCMonitor(model, classifier=model[4])
    with pytest.raises(ValueError, match=r"\(inputs, labels\) pair"):
        monitor.evaluate([(x, y, y)])
    with pytest.raises(TypeError, match="iterable of"):
        monitor.evaluate(3)


# ------------------------------------------------------------------------ distributed
def _distributed_worker(rank, world, port, seed, out_dir):
    with gloo_group(rank, world, port):
        model, (x, y) = mlp(seed), data(seed)
        # Unequal shards; rank 1 never sees class 4.
        mine = torch.arange(len(y))[rank::world]
        if rank == 1:
            mine = mine[y[mine] != 4]
        else:
            extra = torch.arange(len(y))[1::world]
            mine = torch.cat([mine, extra[y[extra] == 4]])
        shard = batches(x[mine], y[mine], (13,))
        # NC4 from buffered features, and (budget 0) from a second pass through the model.
        for budget in (1 << 30, 0):
            monitor = NCMonitor(model, classifier=model[4], memory_budget_bytes=budget)
            metrics = monitor.evaluate(shard)
            torch.save(metrics, os.path.join(out_dir, f"rank{rank}_budget{budget}.pt"))


@pytest.mark.slow  # two spawned processes importing torch: ~5 s on 2 cores
def test_two_gloo_ranks_give_the_metrics_of_all_samples(tmp_path, seed):
    mp.spawn(
        _distributed_worker,
        args=(2, free_port(), seed, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    model, (x, y) = mlp(seed), data(seed)
    with torch.no_grad():
        features = model[:4](x)
    expected = direct(features, y, model[4])
    # Two float64 accumulations of the same samples (one stream, two reduced shards): the
    # tolerance of the brute-force comparisons, N·eps·κ of these features.
    for rank, budget in itertools.product(range(2), (1 << 30, 0)):
        got = torch.load(tmp_path / f"rank{rank}_budget{budget}.pt", weights_only=True)
        assert_same_metrics(got, expected, rtol=oracle_rtol(features, y, 5))
        assert got["nc4_ncc_mismatch"] == expected["nc4_ncc_mismatch"]


# ------------------------------------------------------------------------ TensorBoard
class RecordingWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)


def test_log_to_tensorboard_writes_every_scalar_and_singular_value(seed):
    model, (x, y) = mlp(seed), data(seed)
    metrics = NCMonitor(model, classifier=model[4]).evaluate(batches(x, y))
    writer = RecordingWriter()
    written = log_to_tensorboard(writer, metrics, step=7, prefix="train")
    omega = metrics["snr_singular_values"]
    scalar_keys = [k for k in metrics if k != "snr_singular_values"]
    assert written == len(writer.scalars) == len(scalar_keys) + len(omega)
    for key in scalar_keys:
        assert writer.scalars[f"train/{key}"] == (float(metrics[key]), 7)
    for j, value in enumerate(omega.tolist(), start=1):
        assert writer.scalars[f"train/snr_singular_values/{j}"] == (value, 7)


def test_log_to_tensorboard_rejects_bad_writers_and_values():
    with pytest.raises(TypeError, match="add_scalar"):
        log_to_tensorboard(object(), {"nc1": 1.0}, 0)
    with pytest.raises(TypeError, match="metrics must be a dict"):
        log_to_tensorboard(RecordingWriter(), [("nc1", 1.0)], 0)
    with pytest.raises(TypeError, match=r"metrics\['run'\] is a str"):
        log_to_tensorboard(RecordingWriter(), {"run": "a"}, 0)
    with pytest.raises(TypeError, match=r"metrics\['m'\] is a Tensor"):
        log_to_tensorboard(RecordingWriter(), {"m": torch.ones(2, 2)}, 0)


def test_tensorboard_logger_without_tensorboard_is_a_clear_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'ncfast\[tensorboard\]'"):
        TensorBoardWriter(tmp_path)


def test_tensorboard_logger_writes_event_files(tmp_path, seed):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, (x, y) = mlp(seed), data(seed)
    metrics = NCMonitor(model, classifier=model[4]).evaluate(batches(x, y))
    with TensorBoardWriter(tmp_path, prefix="test") as logger:
        logger.log(metrics, step=3)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "test/nc1" in tags and "test/snr_singular_values/1" in tags
    (event,) = events.Scalars("test/nc1")
    assert event.step == 3
    np.testing.assert_allclose(event.value, metrics["nc1"], rtol=1e-6)  # stored as float32


def _compute_every_epoch_worker(rank, world, port, seed, out_dir):
    with gloo_group(rank, world, port):
        model, (x, y) = mlp(seed), data(seed)
        with torch.no_grad():
            features = model[:4](x)
        first_part = torch.arange(100)[rank::world]
        second_part = torch.arange(100, len(y))[rank::world]
        m = ncfast.Measurement(5, 8, model[4].weight.detach(), model[4].bias.detach())
        for chunk in torch.split(first_part, 17):
            m.update(features[chunk], y[chunk])
        local = m.state_dict()
        first = m.compute(distributed=True)
        second = m.compute(distributed=True)
        local_after = m.state_dict()
        # Training goes on: more batches, and the next epoch's compute.
        for chunk in torch.split(second_part, 17):
            m.update(features[chunk], y[chunk])
        third = m.compute(distributed=True)
        torch.save(
            {
                "first": first,
                "second": second,
                "third": third,
                "local": local["stats"],
                "local_after": local_after["stats"],
                "reduced": m.computed_stats.state_dict(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )


@pytest.mark.slow  # two spawned processes importing torch: ~5 s on 2 cores
def test_distributed_compute_leaves_local_state_and_can_be_called_every_epoch(tmp_path, seed):
    """Measurement.compute(distributed=True) on 2 gloo ranks reduces into a copy: computing
    twice gives the same result (bit for bit), the local statistics are untouched (bit for bit),
    and after more batches the next compute holds every sample of every rank."""
    mp.spawn(_compute_every_epoch_worker, args=(2, free_port(), seed, str(tmp_path)), nprocs=2)
    model, (x, y) = mlp(seed), data(seed)
    with torch.no_grad():
        features = model[:4](x)
    first_part = features[:100], y[:100]
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert saved["first"]["num_samples"] == 100
        assert_same_metrics(saved["second"], saved["first"])  # bit for bit
        for key in ("counts", "shift", "sums", "scatter", "invalid"):
            assert torch.equal(saved["local"][key], saved["local_after"][key]), key
        assert int(saved["local"]["counts"].sum()) == 50  # this rank's own samples only
        # Two float64 accumulations of the same samples: N·eps·κ of these features.
        assert_same_metrics(
            saved["first"], direct(*first_part, model[4]), rtol=oracle_rtol(*first_part, 5)
        )
        assert saved["third"]["num_samples"] == len(y)
        assert_same_metrics(
            saved["third"], direct(features, y, model[4]), rtol=oracle_rtol(features, y, 5)
        )
        reduced = ncfast.ClassStats.from_state_dict(saved["reduced"])
        assert_same_stats(reduced, fed(ncfast.ClassStats(5, 8), features, y), features, y)
