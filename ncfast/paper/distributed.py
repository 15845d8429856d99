"""Several training processes under ``torchrun``: process group, sharding, batch norm over the
global batch.

``torchrun --nproc_per_node=K -m ncfast train ...`` starts K processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`setup` reads them, joins the
process group (NCCL on GPUs, each process on ``cuda:LOCAL_RANK``; gloo on the CPU;
``NCFAST_DIST_BACKEND`` overrides the choice) and returns a :class:`DistributedContext`;
:func:`teardown` leaves the group again if :func:`setup` joined it. Without those variables (or
with ``WORLD_SIZE=1``) everything runs as one ordinary process.

Training keeps the single-process run's global batches: every process draws the same seeded
permutation of the training set, cuts it into the same global batches and takes its share of
each (:func:`shard`); losses are scaled so that DistributedDataParallel's gradient average is
the gradient of the global batch's mean loss (:func:`loss_scale`), and batch norm sees the
global batch (:func:`convert_sync_batchnorm`). The resulting run differs from a single-process
one only by floating-point summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ncfast.errors import NCFastError

BACKEND_ENV = "NCFAST_DIST_BACKEND"
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(NCFastError, ValueError):
    """The process layout cannot run as asked (bad torchrun variables, device, batch size)."""


@dataclass
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, on ``device``."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # setup() initialised the process group (teardown destroys it)

    @property
    def enabled(self) -> bool:
        """True when there are several processes (collectives are needed)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the logs, checkpoints and progress bars."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_ok(self, ok: bool) -> bool:
        """True when ``ok`` is true on every process: how a failure of one rank (rank 0's writes)
        reaches the others instead of leaving them waiting at the next collective."""
        if not self.enabled:
            return ok
        failed = torch.tensor([0.0 if ok else 1.0], device=self.device)
        dist.all_reduce(failed)
        return float(failed) == 0.0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place over all processes (nothing with one process); returns ``tensor``."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        number = int(value)
    except ValueError:
        raise DistributedError(
            f"environment variable {name} must be an integer, got {value!r}"
        ) from None
    if number < 0:
        raise DistributedError(f"environment variable {name} must be ≥ 0, got {number}")
    return number


def torchrun_environment() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` set by torchrun, or None outside torchrun."""
    present = [k for k in _ENV_KEYS if k in os.environ]
    if not present:
        return None
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise DistributedError(
            f"found {present} in the environment but not RANK and WORLD_SIZE: start several "
            "processes with torchrun (torchrun --nproc_per_node=K -m ncfast train ...)"
        )
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world < 1 or rank >= world:
        raise DistributedError(f"RANK={rank} must be below WORLD_SIZE={world} (≥ 1)")
    return rank, world, local_rank


def _process_device(device: str, world_size: int, local_rank: int) -> torch.device:
    """The device of this process: ``cuda`` means ``cuda:LOCAL_RANK`` when there are several."""
    dev = torch.device(device)
    if dev.type != "cuda" or world_size == 1:
        return dev
    if dev.index is not None:
        raise DistributedError(
            f"device {device!r}: with several processes each one uses cuda:LOCAL_RANK; give "
            "--device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DistributedError(
            f"LOCAL_RANK={local_rank} but this machine shows {count} CUDA device(s): start at "
            f"most {count} processes per node (torchrun --nproc_per_node={count})"
        )
    return torch.device("cuda", local_rank)


def setup(device: str) -> DistributedContext:
    """Join the process group of this torchrun job (if any) and place this process.

    An already initialised process group (a caller's own launcher) is used as it is and left
    to the caller. ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (the latter only for one
    process).
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        env = torchrun_environment()
        if env is not None:
            local_rank = env[2]
        else:  # the caller's own launcher: the CUDA device it selected, if any
            local_rank = torch.cuda.current_device() if torch.cuda.is_available() else 0
        dev = _process_device(device, world, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistributedContext(dev, rank, world, local_rank, dist.get_backend(), False)
    env = torchrun_environment()
    if env is None or env[1] == 1:
        return DistributedContext(device=torch.device(device))
    rank, world, local_rank = env
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed")
    dev = _process_device(device, world, local_rank)
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, **kwargs)
    return DistributedContext(dev, rank, world, local_rank, backend, True)


def teardown(ctx: DistributedContext) -> None:
    """Leave the process group if :func:`setup` joined it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard_bounds(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of this rank's contiguous share of ``num_samples`` (sizes differ by at
    most one; rank order follows sample order)."""
    return num_samples * rank // world_size, num_samples * (rank + 1) // world_size


def shard(index: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch ``index`` (see :func:`shard_bounds`)."""
    start, stop = shard_bounds(index.shape[0], rank, world_size)
    return index[start:stop]


def loss_scale(local: int, total: int, world_size: int) -> float:
    """Factor on a rank's mean loss over its ``local`` samples so that DDP's average of the
    gradients over ``world_size`` ranks is the gradient of the mean over all ``total`` samples
    (1 exactly for equal shares)."""
    return 1.0 if local * world_size == total else local * world_size / total


# ------------------------------------------------------------------ batch norm over the ranks
class _AllReduceSum(torch.autograd.Function):
    """Sum over all ranks, differentiable: the gradient of a rank's input is the sum over the
    ranks of the gradients of the output (each rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks, with autograd through it."""
    return _AllReduceSum.apply(tensor)


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode statistics are those of the global batch of all ranks.

    PyTorch's :class:`torch.nn.SyncBatchNorm` does this on GPUs only; this version runs on any
    device and backend (gloo on the CPU): the per-channel sums go through a differentiable
    all-reduce (:func:`all_reduce_sum`), so autograd gives the gradient of the global batch.
    The variance is the mean of centered squares (two reductions), for accuracy. Eval mode, or
    a single process, is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"DistributedBatchNorm2d: expected a 4-d input, got {x.dim()}-d")
        dims = (0, 2, 3)
        x32 = x.float()
        local_count = x.numel() // x.shape[1]
        count_and_sums = torch.cat([x32.new_tensor([float(local_count)]), x32.sum(dims)])
        count_and_sums = all_reduce_sum(count_and_sums)
        count = int(count_and_sums[0].item())
        if count < 2:
            raise ValueError(
                f"DistributedBatchNorm2d: the global batch has {count} value(s) per channel; "
                "batch norm needs at least 2"
            )
        mean = count_and_sums[1:] / count
        centered = x32 - mean.view(1, -1, 1, 1)
        var = all_reduce_sum(centered.square().sum(dims)) / count
        y = centered * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        # As nn.BatchNorm2d: exponential average with `momentum`, cumulative when it is None.
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(
            unbiased_var.to(self.running_var.dtype), alpha=factor
        )


def _to_distributed_bn(module: nn.BatchNorm2d) -> DistributedBatchNorm2d:
    new = DistributedBatchNorm2d(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        device=module.running_mean.device if module.running_mean is not None else None,
    )
    # The same parameter and buffer objects: optimiser state and checkpoints are unchanged.
    if module.affine:
        new.weight, new.bias = module.weight, module.bias
    if module.track_running_stats:
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    return new


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """The model with every BatchNorm2d normalising over the global batch: PyTorch's own
    :class:`torch.nn.SyncBatchNorm` on CUDA, :class:`DistributedBatchNorm2d` elsewhere. Same
    parameters, buffers and state-dict keys."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if type(model) is nn.BatchNorm2d:
        return _to_distributed_bn(model)
    for name, child in model.named_children():
        converted = convert_sync_batchnorm(child, device)
        if converted is not child:
            setattr(model, name, converted)
    return model


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (batch-norm running statistics), so that all ranks
    measure the same network (and it is the one rank 0 saves)."""
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=src)
