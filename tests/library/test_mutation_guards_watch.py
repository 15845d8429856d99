"""Mutation guards of ncfast/watch.py (TrainingWatch): what ``load_state_dict`` refuses, each with
its exact message (a resumed run must not go on from a state of another watch), and what it
restores. The online values themselves are test_online.py's."""

from __future__ import annotations

import torch
from torch import nn

from ncfast.monitor import NCMonitor
from tests.helpers.assertions import raises_exactly


def watched(every: int = 2):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    monitor = NCMonitor(model, model[2])
    return model, monitor.watch_training(every=every)


def trained(model, watch, batches: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        x = torch.randn(9, 6, dtype=torch.float64, generator=gen)
        watch.labels(torch.arange(9) % 3)
        model(x)
        watch.step()


def test_load_state_dict_refuses_a_state_of_another_watch():
    where = "TrainingWatch.load_state_dict"
    model, watch = watched()
    trained(model, watch, 3)
    good = watch.state_dict()
    with raises_exactly(KeyError, f"\"{where}: the state lacks ['window_start', 'counting']\""):
        watch.load_state_dict(
            {k: v for k, v in good.items() if k not in ("window_start", "counting")}
        )
    with raises_exactly(
        ValueError,
        f"{where}: the state is of windows of every=3 steps, this watch has every=2",
    ):
        watch.load_state_dict({**good, "every": 3})
    with raises_exactly(TypeError, f"{where}: step must be an integer, got float 3.0"):
        watch.load_state_dict({**good, "step": 3.0})
    with raises_exactly(ValueError, f"{where}: step must be an integer ≥ 0, got -1"):
        watch.load_state_dict({**good, "step": -1})
    with raises_exactly(ValueError, f"{where}: window_start must be an integer in 0..3, got 4"):
        watch.load_state_dict({**good, "window_start": 4})
    shape_message = (
        f"{where}: previous_means must be a tensor of shape [3, 5] with previous_present of "
        "shape [3], or both None"
    )
    for means, present in (
        (torch.zeros(3, 5), None),
        (None, torch.ones(3, dtype=torch.bool)),
        (torch.zeros(3, 4), torch.ones(3, dtype=torch.bool)),
        (torch.zeros(3, 5), torch.ones(2, dtype=torch.bool)),
        (torch.zeros(3, 5).tolist(), torch.ones(3, dtype=torch.bool)),
    ):
        with raises_exactly(ValueError, shape_message):
            watch.load_state_dict({**good, "previous_means": means, "previous_present": present})
    with raises_exactly(ValueError, f"{where}: nc4_counts must be a tensor of 2 counts"):
        watch.load_state_dict({**good, "nc4_counts": [0, 0]})
    with raises_exactly(ValueError, f"{where}: window must be a ClassStats state_dict"):
        watch.load_state_dict({**good, "window": None})
    watch.close()


def test_load_state_dict_restores_the_steps_the_window_and_the_previous_means():
    """Into a new watch: the step count, the window in progress (window=True) or an empty one
    (window=False), and the previous window's means as float64 and bool."""
    model, watch = watched()
    trained(model, watch, 3)  # one window closed at step 2, one sample batch in the next
    state = watch.state_dict()
    assert state["step"] == 3 and state["window_start"] == 2
    watch.close()
    _, fresh = watched()
    state32 = {
        **state,
        "previous_means": state["previous_means"].float(),
        "previous_present": state["previous_present"].long(),
    }
    assert fresh.load_state_dict(state32) is fresh
    assert (fresh.steps, fresh.window_start) == (3, 2)
    assert fresh.stats.num_samples == 9
    assert fresh.previous_means.dtype == torch.float64
    assert torch.equal(fresh.previous_means, state["previous_means"].float().double())
    assert fresh.previous_present.dtype == torch.bool
    assert torch.equal(fresh.previous_present, state["previous_present"])
    fresh.close()
    _, empty = watched()
    empty.load_state_dict(state, window=False)
    assert (empty.steps, empty.window_start, empty.stats.num_samples) == (3, 2, 0)
    empty.close()
