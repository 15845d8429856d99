"""Several processes: ``torchrun -m ncfast train`` (gloo on the CPU), sharding, batch norm over
the global batch, resume with another number of processes; DeepFool and TensorBoard logging of
``ncfast train``.

The multi-process tests launch the real command line through ``python -m torch.distributed.run``
(two processes, one thread each) on the embedded ``mnist5k`` data with a tiny VGG11, and compare
with one process run here on the same data and seed:

- Measurement: the metrics two processes log for a network equal those one process measures
  from the same checkpoint to 1e-9 (counts exactly). The measurement batch (25) divides both
  processes' shares of both splits, so both see the same features and only the combination of
  the statistics differs.
- Training: the two-process run is the one-process run up to floating-point summation order.
  Observed after two epochs with contiguous activations: SGD loss and measured metrics within
  3e-6 relative (without batch norm over the global batch: 0.17), asserted as 1e-4 (SGD loss)
  and 1e-3 (metrics). With channels-last activations (the default) PyTorch's float32
  channels-last batch-norm kernel on the CPU is itself ~1e-4 off in its outputs (5e-7 when
  contiguous), noise that SGD amplifies: observed 4e-5 here, up to 8e-3 in other small
  configurations; asserted as 1e-3 (SGD loss) and 1e-2 (metrics).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from click.testing import CliRunner

from ncfast.cli import main
from ncfast.paper import distributed as D
from ncfast.paper.checkpoint import load_checkpoint
from ncfast.paper.config import TrainConfig
from ncfast.paper.data import load_dataset
from ncfast.paper.evaluate import measure_split
from ncfast.paper.robustness import robustness
from ncfast.paper.train import (
    ROBUSTNESS_KEYS,
    build_model,
    epoch_batches,
    epoch_permutation,
    min_last_batch,
    train,
)
from tests.helpers.process_group import free_port, gloo_group
from tests.helpers.tiny_runs import TINY_TRAIN_ARGS, read_rows, synthetic_split, tiny_config

REPO = Path(__file__).resolve().parents[2]
# The run of every multi-process test: 50 training images (10 classes), 1000 test images.
PER_CLASS = 5
MEASURE_BATCH = 25  # divides each process's share of both splits (25 and 500)
COMMON = (
    *TINY_TRAIN_ARGS,
    "--per-class",
    str(PER_CLASS),
    "--batch-size",
    "20",
    "--lr",
    "0.01",
    "--measure-epochs",
    "all",
    "--measure-batch-size",
    str(MEASURE_BATCH),
    "--quiet",
)
# Keys that differ between runs by design (timing, process count).
VOLATILE = {"wall_time", "epoch_time", "measure_time", "world_size"}
COUNT_KEYS = ("error", "nc4_ncc_mismatch")


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=nproc -m ncfast ...``,
    one thread per process (2 shared cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "ncfast",
        *args,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def cli(*args: str) -> None:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output


def by_key(rows: list[dict]) -> dict:
    return {(r["epoch"], r["split"]): r for r in rows}


def relative(a: float, b: float, floor: float = 1e-12) -> float:
    return abs(a - b) / max(abs(a), abs(b), floor)


def assert_close_runs(got: list[dict], want: list[dict], epochs, sgd_rtol, rtol, counts):
    """Rows of ``epochs`` agree: SGD loss to ``sgd_rtol``, every measured number to ``rtol``,
    error and NC4 to ``counts`` samples."""
    got, want = by_key(got), by_key(want)
    worst = {}
    for epoch in epochs:
        for split, n in (("train", 10 * PER_CLASS), ("test", 1000)):
            g, w = got[(epoch, split)], want[(epoch, split)]
            assert set(g) == set(w)
            assert relative(g["sgd_loss"], w["sgd_loss"]) <= sgd_rtol, (epoch, split)
            for key in COUNT_KEYS:
                assert abs(g[key] - w[key]) * n <= counts + 1e-9, (epoch, split, key)
            for key, value in w.items():
                if key in VOLATILE or key in COUNT_KEYS or key == "split":
                    continue
                values = value if isinstance(value, list) else [value]
                others = g[key] if isinstance(value, list) else [g[key]]
                for a, b in zip(values, others, strict=True):
                    if isinstance(a, float) and math.isfinite(a):
                        worst[key] = max(worst.get(key, 0.0), relative(a, b, 1e-9))
                    else:
                        assert a == b, key
    bad = {k: v for k, v in worst.items() if v > rtol}
    assert not bad, f"relative differences above {rtol}: {bad}"


# ------------------------------------------------------------------------------- unit level
def test_shards_cover_each_batch_in_order():
    for n in range(0, 23):
        for world in (1, 2, 3, 5):
            bounds = [D.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1
            index = torch.randperm(n)
            parts = [D.shard(index, r, world) for r in range(world)]
            assert torch.equal(torch.cat(parts), index)


def test_loss_scale_makes_the_average_the_global_mean():
    # DDP averages the ranks' gradients; scaled per-rank means average to the global mean.
    torch.manual_seed(0)
    for sizes in ((10, 10), (1, 2), (3, 0 + 4, 5)):
        values = [torch.randn(s, dtype=torch.float64) for s in sizes]
        total, world = sum(sizes), len(sizes)
        averaged = (
            sum(v.mean() * D.loss_scale(len(v), total, world) for v in values if len(v)) / world
        )
        assert float(averaged) == pytest.approx(float(torch.cat(values).mean()), rel=1e-14)
    assert D.loss_scale(10, 20, 2) == 1.0


def test_last_batch_rule():
    assert min_last_batch(1, True) == min_last_batch(1, False) == 2
    assert min_last_batch(2, True) == 2 and min_last_batch(4, True) == 4
    assert min_last_batch(2, False) == 4
    # 50 samples in global batches of 16: the last batch of 2 trains with one process, or two
    # with batch norm over the global batch; not with batch norm over shares of one sample.
    assert epoch_batches(50, 16, min_last_batch(2, True))[-1] == (48, 50)
    assert epoch_batches(50, 16, min_last_batch(2, False))[-1] == (32, 48)


def test_torchrun_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert D.torchrun_environment() is None
    ctx = D.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(D.DistributedError, match="RANK and WORLD_SIZE"):
        D.torchrun_environment()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(D.DistributedError, match="below WORLD_SIZE"):
        D.torchrun_environment()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(D.DistributedError, match="RANK must be an integer"):
        D.torchrun_environment()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.torchrun_environment() == (1, 2, 1)
    with pytest.raises(D.DistributedError, match="cuda:LOCAL_RANK"):
        D._process_device("cuda:1", 2, 1)
    # WORLD_SIZE=1 (torchrun --nproc_per_node=1): one ordinary process, no process group.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ctx = D.setup("cpu")
    assert ctx.world_size == 1 and not ctx.owns_group and not dist.is_initialized()


def test_cli_errors_of_a_process_name_its_rank(tmp_path, monkeypatch):
    # Under torchrun every process prints its own error line: it says which rank it is.
    import importlib

    from ncfast.paper.rundir import RunDirectoryError

    def fails(config, progress):
        raise RunDirectoryError("out: R is in use")

    monkeypatch.setattr(importlib.import_module("ncfast.cli.train"), "train", fails)
    for key, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(main, ["train", *COMMON, "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "Error: rank 1: out: R is in use" in result.output


def test_cli_refuses_a_batch_the_processes_cannot_share(tmp_path, monkeypatch):
    # As torchrun would set it for rank 0 of 3: refused before any process group is joined.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = CliRunner().invoke(main, ["train", *COMMON, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "--batch-size 20" in result.output and "divisible" in result.output
    assert "(3)" in result.output and not dist.is_initialized()
    monkeypatch.setenv("RANK", "nope")
    result = CliRunner().invoke(main, ["train", *COMMON, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "RANK must be an integer" in result.output


def test_measure_split_distributed_needs_a_process_group():
    data = synthetic_split("train", 3, 0)
    model = build_model(tiny_config("x").resolved(), 4, 1, 32)
    with pytest.raises(ValueError, match="init_process_group"):
        measure_split(model, data, loss="mse", sgd_weight_decay=0.0, batch_size=8, distributed=True)


# Unequal shares of one batch of 11 images (channels-last, as training feeds them).
BN_SHARES = ((0, 7), (7, 11))


def _bn_inputs():
    gen = torch.Generator().manual_seed(5)
    x = 3.0 + 2.0 * torch.randn(11, 6, 5, 4, generator=gen, dtype=torch.float64)
    upstream = torch.randn(11, 6, 5, 4, generator=gen, dtype=torch.float64)
    weight = 1.0 + 0.1 * torch.randn(6, generator=gen, dtype=torch.float64)
    bias = 0.1 * torch.randn(6, generator=gen, dtype=torch.float64)
    return x, upstream, weight, bias


def _bn_part(rank: int) -> dict:
    x, upstream, weight, bias = _bn_inputs()
    start, stop = BN_SHARES[rank]
    bn = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
    bn = D.convert_sync_batchnorm(torch.nn.Sequential(bn), torch.device("cpu"))[0]
    assert isinstance(bn, D.DistributedBatchNorm2d)
    mine = x[start:stop].float().contiguous(memory_format=torch.channels_last)
    mine.requires_grad_(True)
    results = {}
    for step in range(2):  # twice: running statistics of two updates
        bn.zero_grad()
        mine.grad = None
        y = bn(mine)
        (y.double() * upstream[start:stop]).sum().backward()
        results[step] = {
            "y": y.detach().clone(),
            "dx": mine.grad.clone(),
            "dweight": bn.weight.grad.clone(),
            "dbias": bn.bias.grad.clone(),
        }
    results["running_mean"] = bn.running_mean.clone()
    results["running_var"] = bn.running_var.clone()
    results["num_batches_tracked"] = bn.num_batches_tracked.clone()
    bn.eval()  # eval: the running statistics, no collective
    results["eval"] = bn(mine).detach().clone()
    return results


MEASURE_KWARGS = {"loss": "mse", "sgd_weight_decay": 5e-4, "batch_size": 7}


def _measured_model():
    return build_model(tiny_config("unused").resolved(), 4, 1, 32)


def _measure_part(rank: int) -> dict:
    """measure_split(distributed=True) on 42 images sorted by class (shares of 21: classes 0-1
    and 1-3), recording which images each rank reads; with the features buffered and (budget
    0) NC4's second pass. Batches of 7 fall on the same images as one process's, so the
    features are the same bits and only the combination of the statistics differs."""
    data = synthetic_split("train", 11, 3)
    data.images, data.labels = data.images[:42], data.labels[:42]
    seen = []
    real_batch = data.batch

    def recording_batch(index, **kwargs):
        seen.extend(index.tolist())
        return real_batch(index, **kwargs)

    data.batch = recording_batch
    model = _measured_model()
    results = {}
    for budget in (1 << 30, 0):
        seen.clear()
        metrics = measure_split(
            model, data, distributed=True, memory_budget_bytes=budget, **MEASURE_KWARGS
        )
        results[budget] = {"metrics": metrics, "seen": list(seen)}
    return results


TRAIN_BATCH = 16  # 40 training images: global batches of 16, 16 and 8


def _train_part(rank: int, out_dir: str) -> dict:
    """One epoch of train() in the caller's process group, recording the images each rank
    trains on."""
    train_data, test_data = synthetic_split("train", 10, 0), synthetic_split("test", 3, 1)
    seen = []
    real_batch = train_data.batch

    def recording_batch(index, **kwargs):
        seen.append(index.tolist())
        return real_batch(index, **kwargs)

    train_data.batch = recording_batch
    config = tiny_config(
        os.path.join(out_dir, "run"), epochs=1, batch_size=TRAIN_BATCH, measure_epochs="none"
    )
    train(config, progress=False, data=(train_data, test_data))
    assert dist.is_initialized()  # the caller's group is left to the caller
    return {"seen": seen}


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        results = {
            "bn": _bn_part(rank),
            "measure": _measure_part(rank),
            "train": _train_part(rank, out_dir),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    results[0]["run"] = out / "run"
    return results


@pytest.mark.slow  # shares the two spawned processes
def test_each_rank_trains_on_its_half_of_every_global_batch(two_rank_results):
    perm = epoch_permutation(40, 0, 1, "cpu").tolist()
    seen = [r["train"]["seen"] for r in two_rank_results]
    batches = epoch_batches(40, TRAIN_BATCH)
    # The training batches, then (before the checkpoint) the one-batch check of the network's
    # eval-mode outputs, the same first images on every rank.
    assert len(seen[0]) == len(seen[1]) == len(batches) + 1 == 4
    first = list(range(min(40, tiny_config("run").measure_batch_size)))
    assert seen[0][-1] == seen[1][-1] == first
    for (start, stop), mine, theirs in zip(batches, seen[0][:-1], seen[1][:-1], strict=True):
        middle = (start + stop) // 2
        assert mine == perm[start:middle] and theirs == perm[middle:stop]
    # Rank 0 wrote the run; the checkpoint holds the plain network.
    payload = load_checkpoint(two_rank_results[0]["run"] / "checkpoint.pt")
    assert payload["epoch"] == 1 and read_rows(two_rank_results[0]["run"]) == []
    assert json.loads((two_rank_results[0]["run"] / "config.json").read_text())["world_size"] == 2


@pytest.mark.slow  # two spawned processes: ~4 s on 2 loaded cores
def test_distributed_measurement_streams_shares_and_combines_exactly(two_rank_results):
    data = synthetic_split("train", 11, 3)
    data.images, data.labels = data.images[:42], data.labels[:42]
    expected = measure_split(_measured_model(), data, **MEASURE_KWARGS)
    for budget in (1 << 30, 0):
        seen = [r["measure"][budget]["seen"] for r in two_rank_results]
        # One pass each (two with the second pass of NC4) over its own contiguous share.
        passes = 1 if budget else 2
        assert seen[0] == list(range(21)) * passes and seen[1] == list(range(21, 42)) * passes
        for r in two_rank_results:
            got = r["measure"][budget]["metrics"]
            assert set(got) == set(expected)
            for key, value in expected.items():
                if isinstance(value, torch.Tensor):
                    torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-12)
                elif key in COUNT_KEYS or isinstance(value, int):
                    assert got[key] == value, key
                else:
                    assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.slow  # shares the two spawned processes above
def test_distributed_batchnorm_is_batchnorm_of_the_global_batch(two_rank_results):
    x, upstream, weight, bias = _bn_inputs()
    ref = torch.nn.BatchNorm2d(6).double()
    with torch.no_grad():
        ref.weight.copy_(weight)
        ref.bias.copy_(bias)
    xr = x.clone().requires_grad_(True)
    for _ in range(2):
        ref.zero_grad()
        xr.grad = None
        y = ref(xr)
        (y * upstream).sum().backward()
    got = [r["bn"] for r in two_rank_results]

    def close(a, b, tol=2e-5):
        scale = b.abs().max().clamp_min(1e-12)
        assert float((a.double() - b).abs().max() / scale) < tol

    close(torch.cat([g[1]["y"] for g in got]), y.detach())
    close(torch.cat([g[1]["dx"] for g in got]), xr.grad)
    # Each rank's parameter gradient is its share; DDP sums (averages) them.
    close(got[0][1]["dweight"] + got[1][1]["dweight"], ref.weight.grad)
    close(got[0][1]["dbias"] + got[1][1]["dbias"], ref.bias.grad)
    for g in got:
        close(g["running_mean"], ref.running_mean)
        close(g["running_var"], ref.running_var)  # unbiased, as nn.BatchNorm2d
        assert int(g["num_batches_tracked"]) == 2
    ref.eval()
    close(torch.cat([g["eval"] for g in got]), ref(x).detach())


# --------------------------------------------------------------------- torchrun end to end
@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """The one-process references, trained here: contiguous and channels-last activations,
    and a channels-last run stopped after epoch 1 (to be resumed by two processes)."""
    root = tmp_path_factory.mktemp("single")
    cli("train", *COMMON, "--no-channels-last", "--out", str(root / "plain"))
    cli("train", *COMMON, "--out", str(root / "cl"))
    cli("train", *COMMON, "--stop-after", "1", "--out", str(root / "cl-stopped"))
    return root


@pytest.mark.slow  # one torchrun launch of two processes, ~10 s on 2 loaded cores
def test_two_processes_train_as_one_and_resume_with_one(one_process_runs, tmp_path):
    single = read_rows(one_process_runs / "plain")
    out = tmp_path / "two"
    # Killed after epoch 1, as a job with a time limit would stop.
    torchrun("train", *COMMON, "--no-channels-last", "--stop-after", "1", "--out", str(out))
    rows = read_rows(out)
    assert [(r["epoch"], r["split"], r["world_size"]) for r in rows] == [
        (1, "train", 2),
        (1, "test", 2),
    ]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["per_process_batch_size"]) == (2, 10)
    assert config["batch_size"] == 20
    # Epoch 1 trained by two processes is epoch 1 trained by one, up to summation order.
    assert_close_runs(rows, single, (1,), sgd_rtol=1e-4, rtol=1e-3, counts=2)

    # Resumed by ONE process: the stored epoch-1 rows stay, epoch 2 continues the run.
    cli("train", "--resume", "--out", str(out), "--quiet")
    resumed = read_rows(out)
    assert resumed[:2] == rows
    assert [(r["epoch"], r["world_size"]) for r in resumed[2:]] == [(2, 1), (2, 1)]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    assert json.loads((out / "config.json").read_text())["world_size"] == 1
    assert_close_runs(resumed, single, (1, 2), sgd_rtol=1e-4, rtol=1e-3, counts=2)
    # A restart from scratch would repeat epoch 1's much larger SGD loss.
    assert resumed[2]["sgd_loss"] < 0.9 * resumed[0]["sgd_loss"]


@pytest.mark.slow  # one torchrun launch of two processes, ~10 s on 2 loaded cores
def test_two_processes_resume_a_one_process_run_and_measure_exactly(one_process_runs, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    shutil.copytree(one_process_runs / "cl-stopped", out)
    first = read_rows(out)
    assert [(r["epoch"], r["world_size"]) for r in first] == [(1, 1), (1, 1)]
    torchrun("train", "--resume", "--out", str(out), "--quiet")
    rows = read_rows(out)
    assert rows[:2] == first
    assert [(r["epoch"], r["split"], r["world_size"]) for r in rows[2:]] == [
        (2, "train", 2),
        (2, "test", 2),
    ]
    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["epoch"] == 2 and payload["history"] == rows
    assert not any(k.startswith("module.") for k in payload["model"])  # no DDP prefix
    # Channels-last: PyTorch's CPU kernel's own float32 error dominates (module docstring).
    whole = read_rows(one_process_runs / "cl")
    assert_close_runs(rows, whole, (1, 2), sgd_rtol=1e-3, rtol=1e-2, counts=3)

    # The two processes' measurement of the epoch-2 network equals one process's measurement
    # of the same network from the checkpoint, batch for batch.
    config = TrainConfig.from_json(payload["config"])
    train_data, test_data = load_dataset(
        "mnist5k", per_class=PER_CLASS, device="cpu", seed=config.seed
    )
    model = build_model(config, 10, 1, 32)
    model.load_state_dict(payload["model"])
    logged = by_key(rows)
    for split, data in (("train", train_data), ("test", test_data)):
        expected = measure_split(
            model,
            data,
            loss=config.loss,
            sgd_weight_decay=config.weight_decay,
            batch_size=MEASURE_BATCH,
        )
        got = logged[(2, split)]
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            if key in COUNT_KEYS or isinstance(value, int):
                assert got[key] == value, key
            elif isinstance(value, list):
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
            else:
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


# ------------------------------------------------------------------- robustness, TensorBoard
@pytest.fixture(scope="module")
def tiny_data_40():
    """The splits of the shared ``tiny_data`` with half the training images: 10 per class."""
    return synthetic_split("train", 10, 0), synthetic_split("test", 6, 1)


def test_robustness_is_logged_on_test_rows(tmp_path, tiny_data_40):
    config = tiny_config(tmp_path / "run", robustness_samples=5, measure_epochs=(2,))
    rows = read_rows(train(config, progress=False, data=tiny_data_40))
    assert [r["split"] for r in rows] == ["train", "test"]
    for row in rows:
        if row["split"] == "train":
            assert "robustness" not in row
            continue
        assert set(ROBUSTNESS_KEYS) <= set(row) and row["robustness_samples"] == 5
        assert math.isfinite(row["robustness"]) and row["robustness"] > 0
        assert row["robustness_time"] >= 0
    # The last row is DeepFool on the run's final network and the seeded sample.
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    model = build_model(config.resolved(), 4, 1, 32)
    model.load_state_dict(payload["model"])
    expected = robustness(model, tiny_data_40[1], samples=5, seed=config.seed, progress=False)
    for key in ROBUSTNESS_KEYS:
        if math.isnan(expected[key]):
            assert math.isnan(rows[-1][key])
        else:
            assert rows[-1][key] == pytest.approx(expected[key], rel=1e-6), key
    # The paper preset turns it on; robustness_samples may change on resume (runtime option).
    assert TrainConfig.from_preset("paper").resolved().robustness_samples == 100
    assert TrainConfig().resolved().robustness_samples == 0
    with pytest.raises(ValueError, match="robustness_samples"):
        tiny_config(tmp_path, robustness_samples=-1).resolved()


def test_tensorboard_logs_every_scalar_per_split(tmp_path, tiny_data_40):
    pytest.importorskip("tensorboard", reason="tensorboard (an optional extra) not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    config = tiny_config(tmp_path / "run", tensorboard=str(logdir), measure_epochs=(2,))
    rows = read_rows(train(config, progress=False, data=tiny_data_40))
    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for row in rows:
        split = row["split"]
        for key, value in row.items():
            if key in ("epoch", "split"):
                continue
            if isinstance(value, list):
                for j, v in enumerate(value, start=1):
                    (event,) = events.Scalars(f"{split}/{key}/{j}")
                    assert event.step == 2 and event.value == pytest.approx(v, rel=1e-6)
            else:
                (event,) = events.Scalars(f"{split}/{key}")
                assert event.step == 2 and event.value == pytest.approx(value, rel=1e-6), key
    # The SGD curve at every epoch, measured or not.
    assert [e.step for e in events.Scalars("sgd/loss")] == [1, 2]
    assert events.Scalars("sgd/loss")[1].value == pytest.approx(rows[0]["sgd_loss"], rel=1e-6)
    assert {"train/nc1", "test/nc1", "sgd/error", "sgd/lr"} <= tags


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    result = CliRunner().invoke(
        main, ["train", *COMMON, "--tensorboard", str(tmp_path / "tb"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "pip install 'ncfast[tensorboard]'" in result.output
    assert "Traceback" not in result.output


def test_stop_after_errors(tmp_path, tiny_data_40):
    with pytest.raises(ValueError, match="stop_after"):
        tiny_config(tmp_path, stop_after=3).resolved()
    out = tmp_path / "run"
    train(tiny_config(out, stop_after=1, measure_epochs="none"), progress=False, data=tiny_data_40)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    result = CliRunner().invoke(
        main, ["train", "--resume", "--out", str(out), "--stop-after", "1", "--quiet"]
    )
    assert result.exit_code == 1 and "already trained 1 epochs" in result.output
