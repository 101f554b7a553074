"""Block outputs of a denoiser's forward: forward hooks on chosen blocks, and a forward that stops early.

The discriminator reads the outputs of some of the denoiser's blocks (UNet levels, transformer blocks); once the last
of them has run, the rest of the forward is wasted, so it is stopped by an exception from that block's hook. Under
gradient checkpointing a transformer runs each block inside ``torch.utils.checkpoint`` (through its
``_gradient_checkpointing_func``); an exception raised there would leave that checkpoint mid-forward, so the stop is
then raised after the checkpointed call returns.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class StopForward(Exception):
    """Raised after the stop block: the forward's remaining blocks are not needed."""


def block_outputs(denoiser: torch.nn.Module, blocks: Sequence[torch.nn.Module], stop: torch.nn.Module | None,
                  keep: Callable[[torch.nn.Module, object], None], call: Callable[[], object]) -> None:
    """Run ``call()`` (a forward of ``denoiser``) with ``keep(block, output)`` called for each of ``blocks`` as it
    runs; the forward ends after ``stop`` has run (``None``: it runs to the end)."""
    inside = [0]  # how deep we are in checkpointed calls
    stopped = [False]

    def hook(block):
        def run(_module, _inputs, output):
            keep(block, output)
            if block is stop:
                stopped[0] = True
                if inside[0] == 0:
                    raise StopForward

        return run

    handles = [b.register_forward_hook(hook(b)) for b in blocks]
    wrap = stop is not None and "_gradient_checkpointing_func" in dir(denoiser)
    had_own = "_gradient_checkpointing_func" in denoiser.__dict__
    if wrap:
        inner = denoiser._gradient_checkpointing_func

        def checkpoint_then_stop(block, *args, **kwargs):
            inside[0] += 1
            try:
                out = inner(block, *args, **kwargs)
            finally:
                inside[0] -= 1
            if stopped[0] and inside[0] == 0:
                raise StopForward
            return out

        denoiser._gradient_checkpointing_func = checkpoint_then_stop
    try:
        call()
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
        if wrap:
            if had_own:
                denoiser._gradient_checkpointing_func = inner
            else:
                del denoiser._gradient_checkpointing_func
