"""What one process of a data-parallel run (Lightning's DDP, FSDP, DeepSpeed: torch.distributed initialised)
needs to know about the others, for the RL stage's statistics: an iteration's rollout is split over the processes,
and what is computed "over the rollout" (advantage whitening, a running baseline, the KL controller's KL, the
logged means) must be computed over all of it, so that N processes act as one process with N times the prompts.

Every function here is a collective under torch.distributed: every process must call it, at the same point, with
tensors of the same shape. In a single process they cost nothing and return their input.
"""

from __future__ import annotations

from typing import Mapping

import torch


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """How many processes share the run (1 without torch.distributed)."""
    return torch.distributed.get_world_size() if _initialised() else 1


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return torch.distributed.get_rank() if _initialised() else 0


def collective_device() -> torch.device:
    """Where the process group's collectives take their tensors: the current GPU under NCCL, else the CPU."""
    if _initialised() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if world_size() == 1:
        return t
    out = t.detach().to(collective_device(), copy=True)
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


def over_processes(values: Mapping[str, float], slowest: tuple[str, ...] = ("time/",)) -> dict[str, float]:
    """Logged values of a step over every process: the mean of each (the processes hold equal shares), except
    the keys starting with one of `slowest`, which take the largest value (the slowest process bounds a step's
    time). Every process must pass the same keys. In a single process: the values as they are."""
    if world_size() == 1:
        return dict(values)
    keys = sorted(values)
    timed = [k for k in keys if k.startswith(slowest)]
    means = [k for k in keys if k not in timed]
    n = world_size()
    summed = sum_over_processes(torch.tensor([float(values[k]) for k in means], dtype=torch.float64)).tolist()
    largest = max_over_processes(torch.tensor([float(values[k]) for k in timed], dtype=torch.float64)).tolist()
    return {**{k: v / n for k, v in zip(means, summed)}, **dict(zip(timed, largest))}


__all__ = ["world_size", "rank", "collective_device", "sum_over_processes", "max_over_processes", "per_process", "over_processes"]
