"""What one process of a data-parallel run (Lightning's DDP, FSDP, DeepSpeed: torch.distributed initialised)
needs to know about the others: for the RL stage's statistics, and for work one process would otherwise repeat
(DAgger's rollouts: `my_share`, `gathered`). For the statistics: an iteration's rollout is split over the processes,
and what is computed "over the rollout" (advantage whitening, a running baseline, the KL controller's KL, the
logged means) must be computed over all of it, so that N processes act as one process with N times the prompts.

Every function here but `world_size`, `rank`, `my_share`, `collective_device`, `raised_everywhere`,
`was_raised_everywhere` and `data_parallel_processes` (and `ValidationShare`) is a collective under
torch.distributed: every process must call it, at the same point (with tensors of the same shape; `gathered` takes
lists of any length). In a single process they cost nothing and return their input.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch

from framework.errors import RLHFError


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """How many processes share the run (1 without torch.distributed)."""
    return torch.distributed.get_world_size() if _initialised() else 1


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return torch.distributed.get_rank() if _initialised() else 0


def collective_device(t: torch.Tensor) -> torch.device:
    """Where a collective takes `t`: an accelerator tensor where it is; a CPU tensor on the CPU when the process
    group's backend takes CPU tensors (gloo, mpi, or a "cpu:gloo,cuda:nccl" pair), else on the current accelerator
    (nccl and the other accelerator-only backends)."""
    if t.device.type != "cpu":
        return t.device
    backend = str(torch.distributed.get_backend())
    if backend in ("gloo", "mpi") or "cpu:" in backend:
        return t.device
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if world_size() == 1:
        return t
    out = t.detach().to(collective_device(t), copy=True)
    torch.distributed.all_reduce(out, op=op)
    return out.to(t.device)


def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over every process (a new tensor; `t` itself in a single process)."""
    return _all_reduce(t, torch.distributed.ReduceOp.SUM if world_size() > 1 else None)


def max_over_processes(t: torch.Tensor) -> torch.Tensor:
    """`t`'s largest value over every process, elementwise (`t` itself in a single process)."""
    return _all_reduce(t, torch.distributed.ReduceOp.MAX if world_size() > 1 else None)


def per_process(value: float) -> list[float]:
    """Every process's `value`, by rank ([value] in a single process)."""
    n = world_size()
    if n == 1:
        return [float(value)]
    slots = torch.zeros(n, dtype=torch.float64)
    slots[rank()] = float(value)
    return sum_over_processes(slots).tolist()


def gathered(items: list) -> list:
    """Every process's `items` (picklable objects), concatenated in rank order (`items` in a single process): the
    pieces of work split over the processes, put back together on each."""
    if world_size() == 1:
        return list(items)
    parts: list = [None] * world_size()
    torch.distributed.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def my_share(n: int) -> range:
    """The indices of n items of work that fall to this process: contiguous shares in rank order, so that
    `gathered` of the shares' results is in the items' order (range(n) in a single process)."""
    size, me = world_size(), rank()
    return range(me * n // size, (me + 1) * n // size)


class ValidationShare(torch.utils.data.DistributedSampler):
    """The sampler of a validation loader of n items: under data parallelism, this process's items (rank, rank +
    world, ...), none repeated. Lightning's own choice, a DistributedSampler, repeats the first items so that every
    process gets as many, and those then count twice in the metrics: with 7 comparisons over 2 processes, one of
    them is scored twice (Lightning warns about it in `trainer.validate`); SFT, which turns Lightning's sampler off,
    scored every item on every process. With this sampler the metrics' states
    (torchmetrics, summed over the processes) hold every item once, and N processes report what one process does.
    Being a DistributedSampler, Lightning keeps it. With fewer items than processes, every process takes them all
    (a process with none would skip the metric syncs that the others wait in); every item then counts N times, which
    leaves a mean (and a rank correlation, a calibration error) as it is, but not a standard deviation over items.

    batches (a stage's `val_batches`; None or 0: all): score only the first `batches` x `batch_size` items, as one
    process's loader under Lightning's `limit_val_batches` would; that setting caps each process's batches, so N
    processes would score N times as many items, and other ones. A stage that passes `batches` leaves
    `limit_val_batches` at 1.0.

    The share is read when the loader is iterated, after Lightning has set up the process group, so the loader can
    be built before `trainer.fit`; in a single process it is the first items in order, as a plain loader's."""

    def __init__(self, n: int, batches: int | None = None, batch_size: int = 1):
        super().__init__(range(n), num_replicas=1, rank=0, shuffle=False)
        self.n = min(n, batches * batch_size) if batches else n

    def share(self) -> range:
        size = world_size()
        return range(self.n) if self.n < size else range(rank(), self.n, size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.share())

    def __len__(self) -> int:
        return len(self.share())


def raised_everywhere(err: BaseException) -> BaseException:
    """Mark `err` as raised by every process of the run at the same point (a collective decision to stop): only
    then may the stop save a checkpoint under DDP (`exception_checkpoint`: saving ends in a barrier, which a
    process that stopped alone would wait in forever). Returns `err`."""
    err.raised_on_every_process = True
    return err


def was_raised_everywhere(err: BaseException) -> bool:
    return bool(getattr(err, "raised_on_every_process", False))


def data_parallel_processes(trainer: Mapping[str, Any]) -> int:
    """How many training processes `trainer` (the trainer config) starts: devices per node x nodes, with
    devices=auto / -1 counted as the GPUs present for a GPU accelerator (Lightning's choice) and 1 otherwise."""
    devices, nodes = trainer.get("devices", "auto"), int(trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices >= 0:
        count = max(devices, 1)
    elif not isinstance(devices, str) and hasattr(devices, "__len__"):  # a list of device ids (or a ListConfig)
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    else:  # auto / -1
        gpu = str(trainer.get("accelerator", "auto")) in ("gpu", "cuda", "auto")
        count = torch.cuda.device_count() if gpu and torch.cuda.is_available() else 1
    return max(count, 1) * nodes


class FailedElsewhere(RLHFError):
    """Another process of the run failed where this one did not; its own error says why."""


@contextmanager
def failing_together(where: str) -> Iterator[None]:
    """Run a block that may fail on some processes only (a reward source, an evaluation on rank 0): every process
    then learns whether any failed, and all stop together; the one that failed raises its own error, the others
    FailedElsewhere naming it. Without this, a process that stops alone leaves the others waiting for it in their
    next collective until the process group's timeout. One collective, also when nothing failed."""
    try:
        yield
    except Exception as err:
        per_process(1.0)
        if world_size() > 1:
            raised_everywhere(err)
        raise
    failed = [r for r, f in enumerate(per_process(0.0)) if f]
    if failed:
        err = FailedElsewhere(f"process {', '.join(map(str, failed))} of {world_size()} stopped {where}; its error "
                              "is above")
        err.echoed_by_rank = rank() if rank() not in failed else None
        raise raised_everywhere(err)


def over_processes(values: Mapping[str, float], slowest: tuple[str, ...] = ("time/",)) -> dict[str, float]:
    """Logged values of a step over every process: the mean of each (the processes hold equal shares), except
    the keys starting with one of `slowest`, which take the largest value (the slowest process bounds a step's
    time). Every process must pass the same keys: other keys are refused, naming this process's. In a single
    process: the values as they are."""
    if world_size() == 1:
        return dict(values)
    keys = sorted(values)
    check = float(zlib.crc32("\n".join(keys).encode()))
    spread = max_over_processes(torch.tensor([check, -check], dtype=torch.float64)).tolist()
    if spread[0] != -spread[1]:
        raise RuntimeError(f"the processes logged different metric names this step; process {rank()} has {keys}. "
                           "Every process must log the same keys (a policy algorithm's metrics must not depend on "
                           "its share of the rollout)")
    timed = [k for k in keys if k.startswith(slowest)]
    means = [k for k in keys if k not in timed]
    n = world_size()
    summed = sum_over_processes(torch.tensor([float(values[k]) for k in means], dtype=torch.float64)).tolist()
    largest = max_over_processes(torch.tensor([float(values[k]) for k in timed], dtype=torch.float64)).tolist()
    return {**{k: v / n for k, v in zip(means, summed)}, **dict(zip(timed, largest))}


__all__ = ["world_size", "rank", "collective_device", "sum_over_processes", "max_over_processes", "per_process",
           "FailedElsewhere", "failing_together", "over_processes", "raised_everywhere", "was_raised_everywhere",
           "data_parallel_processes", "gathered", "my_share"]
