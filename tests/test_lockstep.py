"""dlm.parallel.lockstep on 2 CPU processes (gloo): ranks that make different numbers of forwards of a module whose
forward is itself a collective (as a ZeRO-3 forward gathers parameters) finish together, the short rank making up
the difference with throw-away forwards; a no-op when disabled."""

from __future__ import annotations

import time

import torch
import torch.multiprocessing as mp
from torch import nn


class Gathering(nn.Module):
    """A forward that all-reduces (ZeRO-3's parameter gather stands in): ranks must call it the same number of times."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        t = torch.ones(1)
        torch.distributed.all_reduce(t)
        return x * t


def _worker(rank: int, init: str, out: str) -> None:
    from dlm.parallel.lockstep import lockstep

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    module, dummies = Gathering(), []
    own = 3 if rank == 0 else 1  # the ranks' own forward counts differ
    with lockstep(module, lambda: dummies.append(module(torch.zeros(1))), "cpu"):
        for _ in range(own):
            module(torch.ones(1))
    torch.distributed.barrier()  # a collective after the block pairs up: the rounds matched
    with lockstep(module, lambda: None, "cpu", enabled=False):  # disabled: no vote, no hook
        module(torch.ones(1))
    torch.save({"calls": module.calls, "dummies": len(dummies), "hooks": len(module._forward_pre_hooks)},
               f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_lockstep_pairs_up_ranks_with_different_forward_counts(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    ctx = mp.start_processes(_worker, args=(init, str(tmp_path / "out")), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "the ranks did not finish: lockstep did not pair their forwards"
    finally:
        for proc in ctx.processes:  # a hung rank is not left behind
            if proc.is_alive():
                proc.terminate()
    got = [torch.load(tmp_path / f"out.{r}") for r in (0, 1)]
    # rank 0: its 3 forwards; rank 1: its 1 and 2 throw-away ones; then one each outside the lockstep
    assert got[0] == {"calls": 4, "dummies": 0, "hooks": 0}
    assert got[1] == {"calls": 4, "dummies": 2, "hooks": 0}
