"""Neural Collapse from the training passes themselves: ``ncfast train --online-every K`` and
:class:`ncfast.monitor.TrainingWatch` (rows of split ``train_online``).

The tiny runs train a 1/16-width VGG11 on 80 synthetic images in batches of 16: S = 5 SGD steps
per epoch. "Frozen" runs train at learning rate 0 with batch norm held in eval mode, so every
forward pass of the run computes the same network: their windows of one epoch must give the
eval-mode measurement of that epoch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner
from torch import nn

from ncfast import ClassStats, metrics, mse_lambda, nc_metrics
from ncfast.cli import main
from ncfast.monitor import NCMonitor
from ncfast.paper import training_state
from ncfast.paper.checkpoint import load_checkpoint, save_checkpoint
from ncfast.paper.train import ONLINE_ROW_KEYS, train
from ncfast.report import read_runs
from ncfast.report.plots import ONLINE_FIGURE, figure
from ncfast.report.runs import ONLINE_SPLIT, history_arrays, load_run
from ncfast.report.tables import table1_rows
from tests.helpers.process_group import free_port, gloo_group
from tests.helpers.tiny_runs import TINY_TRAIN_ARGS, read_rows, synthetic_split, tiny_config

STEPS_PER_EPOCH = 5  # 80 training images in batches of 16
TIMING = {"wall_time", "epoch_time", "measure_time"}
# Keys of both an online row and an eval-mode row, defined alike (NC4 is not: the online NC4
# uses the previous window's class means; error and loss are eval mode only).
SHARED_KEYS = [k for k in metrics.SPEC_KEYS if k != "nc4_ncc_mismatch"]


@pytest.fixture(scope="module")
def tiny_data():
    return synthetic_split("train", 20, 0), synthetic_split("test", 6, 1)


def freeze_training(monkeypatch) -> None:
    """Runs of this test train at learning rate 0 with batch norm kept in eval mode: every
    forward pass computes the same network, in train mode as in eval mode."""
    build, make_optimizer = training_state.build_model, training_state.make_optimizer

    def build_frozen(config, *args):
        model = build(config, *args)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
                module.train = types.MethodType(lambda self, mode=True: self, module)
        return model

    def sgd_at_lr_0(model, config, device):
        return make_optimizer(model, dataclasses.replace(config, lr=0.0), device)

    monkeypatch.setattr(training_state, "build_model", build_frozen)
    monkeypatch.setattr(training_state, "make_optimizer", sgd_at_lr_0)


def online_rows(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in rows if r["split"] == ONLINE_SPLIT}


def eval_row(rows: list[dict], epoch: int, split: str = "train") -> dict:
    (row,) = [r for r in rows if r["split"] == split and r["epoch"] == epoch]
    return row


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def assert_shared_keys_agree(got: dict, want: dict, rtol: float) -> None:
    """Every key of :data:`SHARED_KEYS`: counts equal, numbers (and each SNR singular value) to
    ``rtol`` relative."""
    for key in SHARED_KEYS:
        if isinstance(want[key], int):
            assert got[key] == want[key], key
            continue
        pairs = zip(got[key], want[key], strict=True) if isinstance(want[key], list) else []
        for a, b in [*pairs] or [(got[key], want[key])]:
            assert relative(a, b) <= rtol, (key, a, b)


# ------------------------------------------------------------------- ncfast train
def test_a_window_of_one_epoch_at_lr_0_equals_eval_mode(tmp_path, tiny_data, monkeypatch):
    """Learning rate 0, batch norm in eval mode: the training passes of epoch 1 (one window of
    S steps) see the same features as the eval-mode measurement after epoch 1 (the per-sample
    float32 features are the same numbers: batch composition does not change them here), so
    every SPEC key both define agrees up to the float64 summation order of the statistics
    (another batch order and another shift: ~N·eps ≈ 1e-14 relative on the statistics, times
    the conditioning of Σ_W and M̄ on the metrics), asserted to 1e-10. NC4 of epoch 2 (against
    epoch 1's means, the same as epoch 2's) is the eval-mode NC4: the same count."""
    freeze_training(monkeypatch)
    config = tiny_config(tmp_path / "run", online_every=STEPS_PER_EPOCH, measure_epochs=(1, 2))
    rows = read_rows(train(config, progress=False, data=tiny_data))
    online = online_rows(rows)
    assert sorted(online) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    first, second = online[STEPS_PER_EPOCH], online[2 * STEPS_PER_EPOCH]
    assert first["epoch"] == 1.0 and second["epoch"] == 2.0
    assert_shared_keys_agree(first, eval_row(rows, 1), rtol=1e-10)
    assert_shared_keys_agree(second, eval_row(rows, 2), rtol=1e-10)
    assert "nc4_ncc_mismatch" not in first  # the first window has no previous means
    assert second["nc4_ncc_mismatch"] == eval_row(rows, 2)["nc4_ncc_mismatch"]
    assert first["num_samples"] == 80 and first["lr"] == 0.0


def test_online_rows_hold_steps_fractional_epochs_and_the_window_keys(tmp_path, tiny_data):
    """Windows of 2 steps in epochs of 5: rows at steps 2, 4, 6, 8, 10 (epochs 0.4 … 2.0, the
    window of step 6 spans the epoch boundary), in the log between the eval rows of their
    epochs; NC4 from the second window on; the learning rate of each window's last step."""
    out = train(tiny_config(tmp_path / "run", online_every=2), progress=False, data=tiny_data)
    rows = read_rows(out)
    assert [(r["split"], r["epoch"]) for r in rows] == [
        (ONLINE_SPLIT, 0.4),
        (ONLINE_SPLIT, 0.8),
        ("train", 1),
        ("test", 1),
        (ONLINE_SPLIT, 1.2),
        (ONLINE_SPLIT, 1.6),
        (ONLINE_SPLIT, 2.0),
        ("train", 2),
        ("test", 2),
    ]
    online = online_rows(rows)
    assert sorted(online) == [2, 4, 6, 8, 10]
    expected_keys = set(ONLINE_ROW_KEYS) | set(metrics.SPEC_KEYS)
    for step, row in online.items():
        assert list(row)[: len(ONLINE_ROW_KEYS)] == list(ONLINE_ROW_KEYS)
        missing = expected_keys - set(row) - ({"nc4_ncc_mismatch"} if step == 2 else set())
        assert not missing, (step, missing)
        assert ("nc4_ncc_mismatch" in row) == (step > 2)
        assert isinstance(row["step"], int) and row["window_steps"] == 2
        assert row["epoch"] == pytest.approx(step / STEPS_PER_EPOCH, abs=1e-15)
        assert row["num_samples"] == 32 and row["world_size"] == 1
        assert row["lr"] == pytest.approx(0.05 if step <= STEPS_PER_EPOCH else 0.005)
        assert row["weight_decay"] == pytest.approx(mse_lambda(5e-4, 4))
        assert 0 <= row["sgd_error"] <= 1 and row["sgd_loss"] > 0 and math.isfinite(row["nc1"])
    # What ncfast.report reads: the online arrays by step, the eval ones untouched.
    run = load_run(out)
    hist = run.history(ONLINE_SPLIT)
    assert hist["step"].tolist() == [2, 4, 6, 8, 10]
    assert hist["epoch"].tolist() == [0.4, 0.8, 1.2, 1.6, 2.0]
    assert run.history("train")["epoch"].tolist() == [1, 2] and run.last_epoch == 2
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 10


def test_the_window_loss_is_the_epochs_sgd_loss_and_training_is_unchanged(tmp_path, tiny_data):
    """A window of one epoch sums the same per-batch losses in the same order as the epoch's
    sgd_loss (equal bits); and the hook changes nothing in training: the eval rows equal those
    of a run without online measurement."""
    with_online = read_rows(
        train(tiny_config(tmp_path / "a", online_every=STEPS_PER_EPOCH), False, data=tiny_data)
    )
    plain = read_rows(train(tiny_config(tmp_path / "b"), progress=False, data=tiny_data))
    for epoch in (1, 2):
        window = online_rows(with_online)[epoch * STEPS_PER_EPOCH]
        assert window["sgd_loss"] == eval_row(with_online, epoch)["sgd_loss"]
        assert window["sgd_error"] == eval_row(with_online, epoch)["sgd_error"]
    measured = [r for r in with_online if r["split"] != ONLINE_SPLIT]
    assert without_timing(measured) == without_timing(plain)


def test_resume_continues_the_step_count_and_the_window(tmp_path, tiny_data):
    """Stopped after epoch 1 (step 5, inside the window of steps 5-6) and resumed: the rows are
    those of the uninterrupted run (the checkpoint holds the window in progress). A checkpoint
    without the online state (as one edited by hand) still continues the step count, from
    epoch × S; its first window then covers only the steps after the checkpoint."""
    kwargs = {"online_every": 2, "epochs": 3, "measure_epochs": (1, 3)}
    whole = read_rows(train(tiny_config(tmp_path / "a", **kwargs), False, data=tiny_data))
    out = tmp_path / "b"
    train(tiny_config(out, stop_after=1, **kwargs), progress=False, data=tiny_data)
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["step"] == STEPS_PER_EPOCH and payload["online"]["watch"]["step"] == 5
    assert max(online_rows(payload["history"])) == 4
    train(tiny_config(out, resume=True, **kwargs), progress=False, data=tiny_data)
    assert without_timing(read_rows(out)) == without_timing(whole)

    out = tmp_path / "c"
    train(tiny_config(out, stop_after=1, **kwargs), progress=False, data=tiny_data)
    del payload["online"], payload["step"]
    save_checkpoint(out / "checkpoint.pt", payload)
    train(tiny_config(out, resume=True, **kwargs), progress=False, data=tiny_data)
    resumed = online_rows(read_rows(out))
    assert sorted(resumed) == [2, 4, 6, 8, 10, 12, 14]
    assert resumed[6]["window_steps"] == 1 and "nc4_ncc_mismatch" not in resumed[6]
    assert resumed[6]["num_samples"] == 16  # step 6 alone: the window of steps 5-6 lost step 5
    for step in (2, 4, 8, 10, 12, 14):
        assert without_timing([resumed[step]]) == without_timing([online_rows(whole)[step]])


def test_the_cli_option_and_its_check(tmp_path):
    out = tmp_path / "run"
    args = [*TINY_TRAIN_ARGS, "--per-class", "4", "--batch-size", "8", "--measure-epochs", "2"]
    result = CliRunner().invoke(
        main, ["train", *args, "--online-every", "3", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    rows = read_rows(out)  # 40 images in batches of 8: 5 steps per epoch, 10 in all
    assert [r["step"] for r in rows if r["split"] == ONLINE_SPLIT] == [3, 6, 9]
    result = CliRunner().invoke(main, ["train", *args, "--online-every", "-1", "--out", str(out)])
    assert result.exit_code != 0 and "--online-every" in result.output
    with pytest.raises(ValueError, match="online_every"):
        tiny_config(out, online_every=-2).resolved()


def test_an_online_run_analyzes_plots_tabulates_and_reads_as_a_frame(tmp_path):
    """The reports read the eval-mode rows as before and the online rows where they belong:
    analyze counts measured epochs only and draws the online figure (its NC1 line the logged
    online NC1 against steps, the eval-mode dots at epoch × steps per epoch); Table 1 equals
    that of the same log without the online rows; read_runs gives them a step."""
    out = tmp_path / "run"
    args = [*TINY_TRAIN_ARGS, "--per-class", "4", "--batch-size", "8", "--out", str(out)]
    result = CliRunner().invoke(main, ["train", *args, "--online-every", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(
        main, ["analyze", str(out), "--robustness-samples", "2", "--format", "png", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "analysis" / "report.json").read_text())
    measured = {r["epoch"] for r in read_rows(out) if r["split"] != ONLINE_SPLIT}
    assert report["history_epochs"] == len(measured)
    assert (out / "analysis" / "figures" / "online.png").is_file()

    run = load_run(out)
    online = run.history(ONLINE_SPLIT)
    assert online["step"].tolist() == [2, 4, 6, 8, 10]  # 40 images in batches of 8, 2 epochs
    fig = figure([run], ONLINE_FIGURE)
    nc1_ax = fig.axes[0]
    lines = [line for line in nc1_ax.get_lines() if len(line.get_xdata()) == 5]
    assert len(lines) == 1
    assert lines[0].get_xdata().tolist() == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert lines[0].get_ydata().tolist() == online["nc1"].tolist()
    dots = [line for line in nc1_ax.get_lines() if line.get_linestyle() == "None"]
    train_hist = run.history("train")
    assert dots[0].get_xdata().tolist() == (train_hist["epoch"] * 5.0).tolist()
    assert figure([load_run(out)], ONLINE_FIGURE) is not None
    assert run.last_epoch == 2

    plain = tmp_path / "plain" / "run"  # the same name: Table 1 names the run
    plain.mkdir(parents=True)
    (plain / "config.json").write_text((out / "config.json").read_text())
    (plain / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in read_rows(out) if r["split"] != ONLINE_SPLIT)
    )
    assert figure([load_run(plain)], ONLINE_FIGURE) is None
    assert table1_rows([run]) == table1_rows([load_run(plain)])

    pd = pytest.importorskip("pandas")
    df = read_runs(out)
    rows = df[df.split == ONLINE_SPLIT]
    assert sorted(set(rows.step)) == [2, 4, 6, 8, 10]
    assert sorted(set(rows.epoch)) == [0.4, 0.8, 1.2, 1.6, 2.0]
    assert df[df.split != ONLINE_SPLIT].step.isna().all()
    nc1 = rows[rows.key == "nc1"].sort_values("step").value.tolist()
    assert nc1 == online["nc1"].tolist() and df.step.dtype == pd.Int64Dtype()


# ------------------------------------------------------------- two processes (gloo)
def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    freeze_training(patch)
    try:
        with gloo_group(rank, world, port):
            config = tiny_config(
                Path(out) / "two", online_every=3, measure_epochs="none", sync_batchnorm=False
            )
            train(config, progress=False, data=(synthetic_split("train", 20, 0),) * 2)
    finally:
        patch.undo()


@pytest.mark.slow  # two spawned processes training a tiny network: ~15 s on 2 loaded cores
def test_two_processes_log_the_online_rows_of_one(tmp_path, tiny_data, monkeypatch):
    """Two gloo processes, each feeding its half of every batch (frozen network, so both runs
    see the same features): the rows reduced once per window equal those of one process up to
    the float64 order of the statistics (1e-10, as above), NC4 counts exactly; the window's
    SGD loss sums float32 losses of half batches (1e-6)."""
    mp.spawn(_two_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    freeze_training(monkeypatch)
    config = tiny_config(tmp_path / "one", online_every=3, measure_epochs="none")
    one = online_rows(read_rows(train(config, progress=False, data=(tiny_data[0],) * 2)))
    two = online_rows(read_rows(tmp_path / "two"))
    assert sorted(two) == sorted(one) == [3, 6, 9]
    for step, row in two.items():
        assert row["world_size"] == 2 and row["num_samples"] == one[step]["num_samples"]
        assert_shared_keys_agree(row, one[step], rtol=1e-10)
        assert row.get("nc4_ncc_mismatch") == one[step].get("nc4_ncc_mismatch")
        assert row["sgd_loss"] == pytest.approx(one[step]["sgd_loss"], rel=1e-6)
        assert row["sgd_error"] == one[step]["sgd_error"]


# ------------------------------------------------------------------ the library
class Net(nn.Module):
    """A float64 MLP with batch norm: features = the classifier's input."""

    def __init__(self, inputs: int = 12, dim: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, dim), nn.BatchNorm1d(dim), nn.Tanh())
        self.classifier = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))


def blobs(seed: int, n: int = 96, inputs: int = 12, classes: int = 4):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centers = 2.0 * torch.randn(classes, inputs, generator=gen, dtype=torch.float64)
    return centers[labels] + torch.randn(n, inputs, generator=gen, dtype=torch.float64), labels


def test_each_window_is_its_own_samples_and_nc4_uses_the_previous_means(seed):
    """Weights that move (SGD at lr 0.1, batch norm in train mode): each row equals nc_metrics
    of exactly the features the training passes computed in its window, with the classifier
    after the window's last step (the same numbers in the same order: equal), and NC4 counts,
    batch by batch, the samples whose argmax under that batch's classifier differs from the
    nearest of the previous window's class means."""
    torch.manual_seed(seed)
    x, y = blobs(seed)
    model = Net().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    watch = NCMonitor(model, model.classifier, weight_decay=0.01).watch_training(every=3)
    batches = []  # (features, weight, bias) of each training forward pass, and its labels

    def spy(module, args):
        weight, bias = module.weight.detach().clone(), module.bias.detach().clone()
        batches.append([args[0].detach().clone(), weight, bias])

    handle = model.classifier.register_forward_pre_hook(spy)
    rows, classifiers = [], []
    for step in range(9):
        index = torch.randperm(96)[:24]
        watch.labels(y[index])
        loss = ((model(x[index]) - nn.functional.one_hot(y[index], 4).double()) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        batches[-1].append(y[index])
        row = watch.step(epoch=(step + 1) / 3)
        if row is not None:
            rows.append(row)
            classifiers.append([p.detach().clone() for p in model.classifier.parameters()])
    handle.remove()
    watch.close()
    assert [(r["step"], r["epoch"]) for r in rows] == [(3, 1.0), (6, 2.0), (9, 3.0)]
    previous = None
    for k, (row, (weight, bias)) in enumerate(zip(rows, classifiers, strict=True)):
        window = batches[3 * k : 3 * k + 3]
        stats = ClassStats(4, 8)
        for features, _, _, labels in window:
            stats.update(features, labels)
        for key, value in nc_metrics(stats, weight, bias, 0.01).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(row[key], value), (k, key)
            else:
                assert row[key] == value, (k, key)
        if previous is None:
            assert "nc4_ncc_mismatch" not in row
        else:
            wrong = 0
            for features, batch_weight, batch_bias, _ in window:
                nearest = torch.cdist(features, previous).argmin(1)
                decision = (features @ batch_weight.T + batch_bias).argmax(1)
                wrong += int((decision != nearest).sum())
            assert row["nc4_ncc_mismatch"] == wrong / (3 * 24)
        previous = stats.finalized()[0].clone()


def test_a_restored_watch_goes_on_as_the_uninterrupted_one(seed):
    """state_dict in the middle of a window, load_state_dict into a new watch (a resumed run):
    the next rows are the same bits."""
    x, y = blobs(seed)

    def run(stop_at: int | None):
        torch.manual_seed(seed)
        model = Net().double().eval()  # batch norm of running statistics: the same each step
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        monitor = NCMonitor(model, model.classifier)
        watch = monitor.watch_training(every=4)
        rows = []
        for step in range(12):
            if step == stop_at:
                state = watch.state_dict()
                watch.close()
                watch = NCMonitor(model, model.classifier).watch_training(every=4)
                watch.load_state_dict(state)
            index = torch.arange(step * 8, step * 8 + 8) % 96
            watch.labels(y[index])
            model(x[index]).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            row = watch.step()
            rows.append(row)
        watch.close()
        return [r for r in rows if r is not None]

    whole, resumed = run(None), run(6)
    assert len(whole) == 3
    for a, b in zip(whole, resumed, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            same = (
                torch.equal(a[key], b[key])
                if isinstance(a[key], torch.Tensor)
                else a[key] == b[key]
            )
            assert same, key


def test_misuse_is_a_clear_error():
    model = Net().double()
    monitor = NCMonitor(model, model.classifier)
    x, y = blobs(0, n=8)
    with pytest.raises(ValueError, match="every must be an integer ≥ 1"):
        monitor.watch_training(every=0)
    watch = monitor.watch_training(every=2)
    with pytest.raises(RuntimeError, match="already watches"):
        monitor.watch_training(every=2)
    with pytest.raises(RuntimeError, match="without labels"):
        model(x)  # a training forward pass the watch cannot pair with labels
    model.eval()
    model(x)  # eval mode: not a training pass, ignored
    assert watch.stats.num_samples == 0
    model.train()
    watch.labels(y)
    with pytest.raises(ValueError, match="never used"):
        watch.labels(y)
    model(x)
    watch.labels(y[:5])
    with pytest.raises(ValueError, match=r"TrainingWatch.labels: got labels of shape \[5\] for a"):
        model(x)  # 8 samples
    assert watch.stats.num_samples == 8  # the mismatched batch added nothing
    with pytest.raises(ValueError, match="must be a tensor of 2 counts"):
        watch.load_state_dict({**watch.state_dict(), "nc4_counts": torch.zeros(3)})
    with pytest.raises(ValueError, match="every=3"):
        watch.load_state_dict({**watch.state_dict(), "every": 3})
    watch.close()
    with pytest.raises(RuntimeError, match="closed"):
        watch.step()
    model(x)  # closed: the hook is gone
    monitor.watch_training(every=1).close()  # a new watch after closing


def test_a_window_of_one_class_is_a_row_of_nan_with_the_reason():
    model = Net().double()
    watch = NCMonitor(model, model.classifier).watch_training(every=1)
    x, _ = blobs(1, n=8)
    watch.labels(torch.zeros(8, dtype=torch.long))
    model(x)
    row = watch.step()
    assert "1 of 4 classes" in row["nc_undefined"] and math.isnan(row["nc1"])
    assert "nc4_ncc_mismatch" not in row and row["num_samples"] == 8
    watch.close()


def test_history_arrays_of_the_online_split_are_by_step():
    records = [
        {"epoch": 0.5, "split": ONLINE_SPLIT, "step": 4, "nc1": 2.0},
        {"epoch": 0.25, "split": ONLINE_SPLIT, "step": 2, "nc1": 3.0},
        {"epoch": 1, "split": "train", "error": 0.1, "nc1": 1.0},
    ]
    hist = history_arrays(records, ONLINE_SPLIT)
    assert hist["step"].tolist() == [2, 4] and hist["epoch"].tolist() == [0.25, 0.5]
    assert hist["nc1"].tolist() == [3.0, 2.0]
    assert history_arrays(records, "train")["epoch"].tolist() == [1]
