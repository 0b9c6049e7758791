"""DeepSpeed plumbing kept apart from the models: ZeRO-3 leaf modules for MoE blocks, and consolidation of a
run's checkpoint (a DeepSpeed ZeRO folder or a plain Lightning file) into an HF-format folder.

    python -m dlm.consolidate <run_dir> [--ckpt last|best|PATH] [--out <run_dir>/hf]

Loading pretrained weights under ZeRO-3: the training CLI builds the backbone (``from_pretrained``) before
``trainer.fit``, outside ``deepspeed.zero.Init`` (the families define no ``configure_model`` hook, the only
place Lightning's DeepSpeedStrategy enters the partitioned-init context), so every rank holds the real weights
on the host and ``deepspeed.initialize`` partitions them. Host memory per node is therefore ranks x model size
in the load dtype (moe30b in bf16: ~61 GB per rank). ``from_pretrained`` inside ``zero.Init`` alone would give
empty (partitioned, size-0) tensors that the checkpoint is never copied into; with a live
``transformers.integrations.HfDeepSpeedConfig`` (it needs the ``accelerate`` package) transformers instead
copies the checkpoint into the partitions itself, experts fused as usual (checked on CPU, 1 and 2 ranks), which
would need the backbone built in a ``configure_model`` hook. Verified on CPU: tests/test_zero3_cpu.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


# ---- ZeRO-3 leaf modules -----------------------------------------------------------------------------------
def moe_block_classes(model: nn.Module) -> list[type]:
    """Classes of the sparse-MoE blocks in ``model``: modules with a child named ``experts`` (Qwen3-MoE's
    ``Qwen3MoeSparseMoeBlock``, Mixtral's, the native MoE layer). Routing picks different experts every step,
    so ZeRO-3's recorded prefetch order breaks unless the whole block is fetched at once (a leaf)."""
    classes: dict[str, type] = {}
    for module in model.modules():
        if "experts" in dict(module.named_children()):
            classes[type(module).__qualname__] = type(module)
    return list(classes.values())


def register_moe_leaf_modules(model: nn.Module) -> list[nn.Module]:
    """Flag every MoE block as a ZeRO-3 leaf (``deepspeed.utils.set_z3_leaf_modules``); call before
    ``deepspeed.initialize``. Returns the flagged modules (empty for a dense model)."""
    classes = moe_block_classes(model)
    if not classes:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    return set_z3_leaf_modules(model, classes)


def zero_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a Lightning DeepSpeedStrategy (from its DeepSpeed config), None if it has none."""
    config = getattr(strategy, "config", None) or {}
    stage = config.get("zero_optimization", {}).get("stage")
    return None if stage is None else int(stage)


# ---- consolidation into an HF folder -----------------------------------------------------------------------
def load_state_dict(checkpoint: str | Path, scratch: Path | None = None) -> dict[str, torch.Tensor]:
    """The module state dict of a checkpoint: a Lightning ``.ckpt`` file, or a DeepSpeed ZeRO checkpoint folder
    (its shards consolidated to fp32 in memory; also written as a Lightning-loadable file to ``scratch`` when
    given, with Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``). Nothing is written next to the
    checkpoint: a ``<name>-fp32.ckpt`` there would be as large as the model in fp32 and match ``best*.ckpt``."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir() and scratch is not None:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        convert_zero_checkpoint_to_fp32_state_dict(checkpoint, scratch)
        checkpoint = Path(scratch)
    elif checkpoint.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
        prefix = "_forward_module."  # Lightning < 2.1 wrapped the module
        return {k.removeprefix(prefix): v for k, v in state.items()}
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return state.get("state_dict", state)


def export_hf_folder(cfg, state_dict: dict[str, torch.Tensor], out: str | Path, extra: dict | None = None) -> Path:
    """Write an HF-format folder (config.json + safetensors) for the HFCausalLM backbone of a run's config, with
    the weights of ``state_dict`` (keys ``backbone.hf_model.*``). The model is built on the meta device, so no
    second copy of the weights is allocated and nothing is downloaded beyond the checkpoint's config."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from dlm.models.hf import HFCausalLM, pretrained_geometry

    model_cfg = cfg.model
    if model_cfg.get("_target_") != "dlm.models.hf.HFCausalLM":
        raise ValueError(f"consolidation to an HF folder needs an HFCausalLM model, not {model_cfg.get('_target_')}")
    prefix = "backbone.hf_model."
    hf_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not hf_state:
        raise ValueError(f"no {prefix}* weights in the checkpoint (keys start {list(state_dict)[:3]})")
    geometry = dict(OmegaConf.to_container(model_cfg.config, resolve=True)) if model_cfg.get("config") else {}
    if model_cfg.get("pretrained"):
        geometry = {**pretrained_geometry(model_cfg.pretrained), **geometry}
    model_cfg = OmegaConf.merge(model_cfg, {"pretrained": None, "gradient_checkpointing": False})
    model_cfg.config = geometry
    with torch.device("meta"):
        backbone: HFCausalLM = instantiate(model_cfg, vocab_size=None)
    emb_name = next(n for n, p in backbone.hf_model.named_parameters() if p is backbone.hf_model.get_input_embeddings().weight)
    rows = hf_state[emb_name].shape[0]
    if rows != backbone.vocab_size:  # the run grew the embedding for its tokenizer
        model_cfg.config = {**geometry, "vocab_size": rows}
        with torch.device("meta"):
            backbone = instantiate(model_cfg, vocab_size=None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    backbone.hf_model.save_pretrained(out, state_dict={k: v.contiguous() for k, v in hf_state.items()})
    (out / "dlm_export.json").write_text(json.dumps(extra or {}, indent=2) + "\n")
    return out


def consolidate_run(run_dir: str | Path, ckpt: str = "last", out: str | Path | None = None) -> Path:
    """A run's checkpoint (``last``, ``best`` or a path; a DeepSpeed folder or a file) -> ``<run_dir>/hf``."""
    from dlm.run import load_config

    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints"
    if ckpt == "last":
        path = folder / "last.ckpt"
    elif ckpt == "best":
        found = sorted(folder.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"{folder}: no best-*.ckpt")
        path = found[-1]
    else:
        path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    cfg = load_config(run_dir)
    state = load_state_dict(path)
    method = cfg.method
    extra = {
        "method": str(method._target_).rsplit(".", 1)[-1].lower(),
        "shift_logits": bool(method.get("shift_logits", False)),
        "checkpoint": str(path),
    }
    return export_hf_folder(cfg, state, out or run_dir / "hf", extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlm.consolidate", description=consolidate_run.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--ckpt", default="last", help="last | best | a checkpoint file or DeepSpeed folder")
    parser.add_argument("--out", default=None, help="output folder (default <run_dir>/hf)")
    args = parser.parse_args(argv)
    print(f"hf: {consolidate_run(args.run_dir, args.ckpt, args.out)}")
