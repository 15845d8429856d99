"""A split of a dataset held as uint8 tensors on its device, normalised per batch on the device."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class LabeledImages:
    """Decoded images and labels of one split, kept on one device.

    ``images`` is uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]`` in ``0..num_classes-1``;
    ``mean``/``std`` (float32 ``[C]``, same device) are the per-channel statistics of the
    *training* subset in units of [0, 1]-scaled pixels, which both splits normalise with.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    name: str
    split: str
    _scale: torch.Tensor = field(init=False, repr=False)
    _shift: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        where = f"LabeledImages({self.name}/{self.split})"
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"{where}: images must be uint8 [N, C, H, W], got {self.images.dtype} "
                f"{list(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"{where}: labels must be int64 [{self.images.shape[0]}], got "
                f"{self.labels.dtype} {list(self.labels.shape)}"
            )
        channels = self.images.shape[1]
        for stat_name in ("mean", "std"):
            stat = getattr(self, stat_name)
            if stat.shape != (channels,) or not stat.is_floating_point():
                raise ValueError(
                    f"{where}: {stat_name} must be float [{channels}], got {stat.dtype} "
                    f"{list(stat.shape)}"
                )
        device = self.images.device
        if self.labels.device != device:
            raise ValueError(f"{where}: labels on {self.labels.device}, images on {device}")
        self.mean = self.mean.to(device=device, dtype=torch.float32)
        self.std = self.std.to(device=device, dtype=torch.float32)
        # x_norm = (x/255 - mean)/std = x * scale - shift, computed in two fused in-place ops.
        self._scale = (1.0 / (255.0 * self.std)).view(1, channels, 1, 1)
        self._shift = (self.mean / self.std).view(1, channels, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    def batch(
        self, index: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 images ``[b, C, H, W]`` and int64 labels ``[b]`` for ``index``.

        Gathers, converts and normalises on the data's device without a host synchronisation
        (pass ``index`` on that device; a CPU index is copied over). ``memory_format`` may be
        ``torch.channels_last`` for convolution-heavy models on CUDA.
        """
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
        if index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(
                f"index must be a 1-D integer tensor, got {index.dtype} {list(index.shape)}"
            )
        if index.device != self.images.device:
            index = index.to(self.images.device, non_blocking=True)
        images = self.images.index_select(0, index).to(torch.float32, memory_format=memory_format)
        images.mul_(self._scale).sub_(self._shift)
        return images, self.labels.index_select(0, index)

    def class_counts(self) -> torch.Tensor:
        """Number of samples of each class, int64 ``[num_classes]`` on the data's device.

        Computed without a host synchronisation (unlike ``torch.bincount`` on CUDA).
        """
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=self.labels.device)
        return counts.index_add_(0, self.labels, torch.ones_like(self.labels))

    def to(self, device: str | torch.device) -> LabeledImages:
        """A copy on ``device`` (the same object if it is already there)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.images.device:
            return self
        return LabeledImages(
            self.images.to(device),
            self.labels.to(device),
            self.num_classes,
            self.mean.to(device),
            self.std.to(device),
            self.name,
            self.split,
        )
