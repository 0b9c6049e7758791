"""The bookkeeping of GRPO's rollouts (dlm/methods/grpo.py): which completion positions are scored, the prompt
lengths every rank generates under ZeRO-3, moving a checkpointed batch of generations between devices, and the
samples.jsonl rows a resume drops."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlm.stop_tokens import is_stop

ROLLOUT = "rollout"  # the samples.jsonl kind of RL generations


def all_lengths(lengths: list[int]) -> list[int]:
    """The prompt lengths drawn by any rank this step, sorted (the same list on every rank)."""
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, sorted(lengths))
    return sorted({P for rank_lengths in gathered for P in rank_lengths})


def completion_mask(tokens: Tensor, prompt_len: int, stops: Sequence[int] | None) -> Tensor:
    """The completion positions up to and including the first stop token (EOS or an end-of-turn token of
    ``stops``: TRL's completion mask); all of them when ``stops`` is None."""
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    if stops is None:
        mask[:, prompt_len:] = True
        return mask
    stop = is_stop(tokens[:, prompt_len:], stops).long()
    eos_before = stop.cumsum(1) - stop
    mask[:, prompt_len:] = eos_before == 0
    return mask


def to_device(node: Any, device) -> Any:
    if isinstance(node, Tensor):
        return node.to(device)
    if isinstance(node, dict):
        return {k: to_device(v, device) for k, v in node.items()}
    if isinstance(node, list):
        return [to_device(v, device) for v in node]
    return node


def drop_rollouts_from(path: Path | None, step: int) -> None:
    """A resume at ``step`` drops the rollout rows generated at or after it (they are generated again)."""
    if path is None or not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if not (line.strip() and json.loads(line).get("kind") == ROLLOUT
                                           and int(json.loads(line).get("step", -1)) >= step)]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
