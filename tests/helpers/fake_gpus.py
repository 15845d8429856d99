"""CUDA devices that are not there, for the tests of what ncfast does on GPUs it cannot use."""

from __future__ import annotations

import torch


def fake_cuda_devices(monkeypatch, devices: list[tuple[str, tuple[int, int]]]) -> None:
    """``torch.cuda`` answering for ``devices`` ([(name, capability)], indexed from 0); the
    per-device cache of :mod:`ncfast.backend.precision` is emptied and kept off, so no answer
    about a fake GPU outlives the test."""
    from ncfast.backend import precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(devices))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: devices[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: devices[i][1])
    precision._auto_precision.cache_clear()
    monkeypatch.setattr(precision, "_auto_precision", precision._auto_precision.__wrapped__)
