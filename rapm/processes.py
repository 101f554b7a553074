"""This process's place and device: one process, or one of several under ``accelerate launch`` (data parallel)."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)



class Processes:
    """This process's place under ``accelerate launch`` (data parallel, batch per process), or a single process.

    Gradients are averaged by an all-reduce after each backward pass rather than by wrapping the UNet in DDP: the
    alternation trains different parameter sets on alternate steps, which DDP's fixed bucket plan does not allow.
    """

    def __init__(self, cpu: bool | None = None):
        """``cpu``: the processes run on CPUs (gloo), by default where no GPU is (accelerate's PartialState starts gloo
        across CPU processes only when told so)."""
        self.rank, self.world, self.device = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available() if cpu is None else cpu)
            self.rank, self.world, self.device = state.process_index, state.num_processes, state.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return (t / self.world).tolist()

    def any(self, flag: bool) -> bool:
        return self.mean([float(flag)])[0] > 0

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten().float() for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
