"""Reading a run's checkpoint whatever strategy wrote it: a Lightning ``.ckpt`` file or a DeepSpeed ZeRO folder
(consolidated in memory), and the EMA shadow it holds. Every file is vetted first (dlm/safe_load.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from dlm.safe_load import check, load_checkpoint


def load_state_dict(checkpoint: str | Path, scratch: Path | None = None) -> dict[str, torch.Tensor]:
    """The module state dict of a checkpoint: a Lightning ``.ckpt`` file, or a DeepSpeed ZeRO checkpoint folder
    (its shards consolidated to fp32 in memory; also written as a Lightning-loadable file to ``scratch`` when
    given, with Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``). Nothing is written next to the
    checkpoint: a ``<name>-fp32.ckpt`` there would be as large as the model in fp32 and match ``best*.ckpt``."""

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():  # DeepSpeed unpickles its files without restriction: every one is vetted first
        check(checkpoint)
    if checkpoint.is_dir() and scratch is not None:
        from lightning.pytorch.utilities.deepspeed import (
            convert_zero_checkpoint_to_fp32_state_dict,  # lazily: only for DeepSpeed folders
        )

        convert_zero_checkpoint_to_fp32_state_dict(checkpoint, scratch)
        checkpoint = Path(scratch)
    elif checkpoint.is_dir():
        from deepspeed.utils.zero_to_fp32 import (
            get_fp32_state_dict_from_zero_checkpoint,  # lazily: only for DeepSpeed folders
        )

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
        prefix = "_forward_module."  # Lightning < 2.1 wrapped the module
        return {k.removeprefix(prefix): v for k, v in state.items()}
    state = load_checkpoint(checkpoint)  # weights_only, dlm's allowlist (dlm/safe_load.py)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def ema_weights(checkpoint: str | Path) -> dict[str, Tensor] | None:
    """The EMA shadow (parameter name -> float32 tensor; tied parameters under each of their names) saved by
    :class:`EMA` in a Lightning ``.ckpt`` file or a DeepSpeed checkpoint folder (its client state), or None when the
    run had no EMA."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():  # DeepSpeed: Lightning's client state sits in the model-states file
        files = sorted(checkpoint.glob("*/mp_rank_00_model_states.pt"))
        if not files:
            return None
        checkpoint = files[0]

    # memory-mapped: only the shadow's tensors are read (the weights were loaded once already); weights_only
    state = load_checkpoint(checkpoint, mmap=True)
    ema = (state.get("callbacks") or {}).get("EMA") if isinstance(state, dict) else None
    if ema is None:
        return None
    shadow = dict(ema["shadow"])
    shadow.update({alias: shadow[name] for alias, name in ema.get("aliases", {}).items()})
    return shadow
