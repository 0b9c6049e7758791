"""Forwards in lockstep across ranks, for generation whose call count differs from rank to rank under ZeRO-3.

Under DeepSpeed ZeRO-3 every module forward gathers the module's parameter shards from all ranks (a collective), so
every rank must run the same sequence of forwards. End-of-fit sampling gets that for free: every rank draws the same
samples from the same seed (dlm/callbacks/samples.py). RL rollouts cannot: each rank samples its own prompts and
completions, and the samplers stop early on data (a step that reveals nothing makes no call, a block whose rows all
hit EOS ends, a threshold commits a varying number per step), so the call counts differ.

:func:`lockstep` is what ``transformers``' ``generate(synced_gpus=True)`` does for its decoding loop, at the level of
one module: inside the block, before every forward of ``module`` the rank votes 1 (an all-reduce of "still working");
when the block's code is done the rank keeps voting 0 and running ``dummy()`` (one forward of the same module on a
throw-away input) for as long as any other rank voted 1. Each round is then one all-reduce and one forward of the
same module on every rank, whatever each rank's own count was. The vote runs before DeepSpeed's own pre-forward hook
(``prepend``), so it precedes that forward's gathers on every rank. Forwards without gradient only: a backward
cannot be padded this way (GRPO makes its training forwards line up instead, dlm/methods/grpo.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


def gathers_parameters(strategy) -> bool:
    """Whether every forward under ``strategy`` is collective across its ranks: DeepSpeed ZeRO stage 3 with more
    than one process (parameters live in shards)."""
    from dlm.parallel.deepspeed import zero_stage  # lazily: Lightning's strategies are a slow import

    return zero_stage(strategy) == 3 and getattr(strategy, "world_size", 1) > 1


def _vote(flag: int, device) -> int:
    t = torch.tensor([flag], dtype=torch.long, device=device)
    torch.distributed.all_reduce(t)
    return int(t.item())


@contextlib.contextmanager
def lockstep(module: nn.Module, dummy: Callable[[], object], device, enabled: bool = True) -> Iterator[None]:
    """Every forward of ``module`` in the block in lockstep with the other ranks' (module docstring); ``dummy()``: one
    forward of ``module`` on any input, run while other ranks still work. ``device``: where the vote's tensor lives
    (the process group's: CUDA under NCCL). A no-op when not ``enabled``. An exception inside the block is raised
    without the final rounds (the run is lost anyway)."""
    if not enabled:
        yield
        return
    draining = False

    def vote_first(_module, _args):
        if not draining:
            _vote(1, device)

    handle = module.register_forward_pre_hook(vote_first, prepend=True)
    try:
        yield
        draining = True
        with torch.no_grad():
            while _vote(0, device) > 0:
                dummy()
    finally:
        handle.remove()
