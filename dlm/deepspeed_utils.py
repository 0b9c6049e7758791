"""DeepSpeed plumbing kept apart from the models: ZeRO-3 leaf modules for MoE blocks, and consolidation of a
run's checkpoint (a DeepSpeed ZeRO folder or a plain Lightning file) into an HF-format folder.

    python -m dlm.consolidate <run_dir> [--ckpt last|best|PATH] [--out <run_dir>/hf]

Loading pretrained weights under ZeRO-3 (the training CLI; see :func:`load_backbone_into_partitions`): with a
DeepSpeedStrategy at stage 3 and an ``HFCausalLM`` whose ``pretrained`` weights load, the module is built around a
placeholder backbone on the meta device (the checkpoint's geometry, no weights), and ``DiffusionLM.configure_model``
builds the real one: Lightning runs that hook inside ``deepspeed.zero.Init``, and with a live
``transformers.integrations.HfDeepSpeedConfig`` (it needs the ``accelerate`` package) ``from_pretrained`` copies the
checkpoint into the partitions itself, experts fused as usual. Host memory: rank 0 reads the checkpoint
(safetensors, memory-mapped: file-backed pages), the other ranks only its keys and shapes, and every rank keeps its own partition
plus one module's gathered parameters at a time, instead of ranks x model size in the load dtype (moe30b in bf16:
~61 GB per rank) when every rank loaded the whole model before ``deepspeed.initialize`` partitioned it. Every
other path (no DeepSpeed, ZeRO-1/2, models from a config, native backbones) builds the backbone before
``trainer.fit`` as before. Verified on CPU, 1 and 2 ranks: tests/test_zero3_cpu.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlm.errors import user_errors


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


# ---- pretrained weights straight into ZeRO-3 partitions ---------------------------------------------------
# Why: under ZeRO-3 a backbone built before trainer.fit is whole on every rank's host until deepspeed.initialize
# partitions it (ranks x model size per node); built inside the strategy's zero.Init it never is.
def zero3_strategy(trainer_cfg: Any) -> Any | None:
    """The trainer config's strategy when it is a Lightning DeepSpeedStrategy (subclasses too) at ZeRO stage 3
    (instantiated on its own to read its stage; the Trainer builds its own), else None. Nothing is instantiated
    for any other strategy."""
    from hydra.utils import get_class, instantiate
    from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry

    spec = trainer_cfg.get("strategy") if trainer_cfg is not None else None
    if isinstance(spec, str):
        strategy = StrategyRegistry.get(spec) if spec.startswith("deepspeed") and spec in StrategyRegistry else None
    elif hasattr(spec, "get") and spec.get("_target_") and issubclass(get_class(spec["_target_"]), DeepSpeedStrategy):
        strategy = instantiate(spec)
    else:
        strategy = spec if isinstance(spec, DeepSpeedStrategy) else None
    return strategy if isinstance(strategy, DeepSpeedStrategy) and zero_stage(strategy) == 3 else None


def loads_pretrained_weights(model_cfg: Any) -> bool:
    """Whether a model config builds an HFCausalLM (subclasses too) from a checkpoint's weights."""
    from hydra.utils import get_class

    from dlm.models.hf import HFCausalLM

    target = model_cfg.get("_target_")
    return bool(target and issubclass(get_class(target), HFCausalLM) and model_cfg.get("pretrained")
                and model_cfg.get("load_weights", True))


def placeholder_backbone(model_cfg: Any, vocab_size: int | None) -> nn.Module:
    """The backbone of ``model_cfg`` on the meta device: the checkpoint's geometry (``config`` fields over it) and
    no weights, so the module's constructor checks (vocabulary, max_seq_len, lr roles) run before the real
    backbone exists. Same parameter names and shapes as the loaded one."""
    from hydra.utils import instantiate

    with torch.device("meta"):
        backbone = instantiate(model_cfg, vocab_size=vocab_size, load_weights=False)
    backbone.zero3_placeholder = True
    return backbone


def load_backbone_into_partitions(model_cfg: Any, vocab_size: int | None, strategy: Any,
                                  compile_mode: str | None = None) -> nn.Module:
    """The real backbone of ``model_cfg``, built where ``DiffusionLM.configure_model`` runs (inside the
    strategy's ``deepspeed.zero.Init`` under ZeRO-3). A live ``HfDeepSpeedConfig`` makes ``from_pretrained`` (and
    the embedding growth's ``resize_token_embeddings``) partition-aware; it is unset afterwards, so later model
    builds in the process (consolidation on the meta device) are ordinary. MoE blocks become ZeRO-3 leaf modules
    (``setup`` flagged the placeholder's). Prints how much of the model this rank holds. The model's modules are
    imported by then (the placeholder was built from them): a first import of ``torch._dynamo`` inside
    ``zero.Init`` fails (DeepSpeed patches ``Tensor.__new__``)."""
    from hydra.utils import instantiate

    from dlm.compile import compile_backbone

    if zero_stage(strategy) != 3:  # not partitioned after all: an ordinary build, as before trainer.fit
        return compile_backbone(instantiate(model_cfg, vocab_size=vocab_size), compile_mode)
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    ds_config = HfDeepSpeedConfig(strategy.config)  # transformers keeps only a weak reference: hold it
    try:
        backbone = instantiate(model_cfg, vocab_size=vocab_size)
    finally:
        unset_hf_deepspeed_config()
        del ds_config
    params = list(backbone.parameters())
    whole = [n for n, p in backbone.named_parameters() if not hasattr(p, "ds_id")]
    if whole:
        raise RuntimeError(f"ZeRO-3 loading left {len(whole)} parameters unpartitioned (e.g. {whole[:3]})")
    register_moe_leaf_modules(backbone)
    held, total = sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    print(f"zero3: rank {rank} loaded {model_cfg.pretrained} into ZeRO-3 partitions: "
          f"{held:,} of {total:,} parameter elements held", flush=True)
    return compile_backbone(backbone, compile_mode)


# ---- consolidation into an HF folder -----------------------------------------------------------------------
def load_state_dict(checkpoint: str | Path, scratch: Path | None = None) -> dict[str, torch.Tensor]:
    """The module state dict of a checkpoint: a Lightning ``.ckpt`` file, or a DeepSpeed ZeRO checkpoint folder
    (its shards consolidated to fp32 in memory; also written as a Lightning-loadable file to ``scratch`` when
    given, with Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``). Nothing is written next to the
    checkpoint: a ``<name>-fp32.ckpt`` there would be as large as the model in fp32 and match ``best*.ckpt``."""
    from dlm.safe_load import check, load_checkpoint

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():  # DeepSpeed unpickles its files without restriction: every one is vetted first
        check(checkpoint)
    if checkpoint.is_dir() and scratch is not None:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        convert_zero_checkpoint_to_fp32_state_dict(checkpoint, scratch)
        checkpoint = Path(scratch)
    elif checkpoint.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
        prefix = "_forward_module."  # Lightning < 2.1 wrapped the module
        return {k.removeprefix(prefix): v for k, v in state.items()}
    state = load_checkpoint(checkpoint)  # weights_only, dlm's allowlist (dlm/safe_load.py)
    return state.get("state_dict", state) if isinstance(state, dict) else state


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


def consolidate_run(run_dir: str | Path, ckpt: str = "last", out: str | Path | None = None,
                    use_ema: bool = True) -> Path:
    """A run's checkpoint (``last``, ``best`` or a path; a DeepSpeed folder or a file) -> ``<run_dir>/hf``; a run
    trained with ``callbacks=ema`` exports its EMA weights unless ``use_ema=False``."""
    from dlm.callbacks.ema import ema_weights
    from dlm.errors import UserError
    from dlm.run import find_checkpoint, load_config, resolve_run_path

    run_dir, _ = resolve_run_path(run_dir)  # NotARunError (one line) for anything but a run folder
    cfg = load_config(run_dir)
    target = cfg.model.get("_target_")
    if target != "dlm.models.hf.HFCausalLM":  # say so before reading a checkpoint that cannot be exported
        raise UserError(
            f"dlm.consolidate exports runs whose model is an HF backbone (model._target_=dlm.models.hf.HFCausalLM); "
            f"{run_dir} has model._target_={target}. Use the run folder itself instead: dlm.generate run=<run>, "
            f"dlm.evaluate run=<run> and dlm.run.load_run read its checkpoint as it is (an AR run also writes "
            f"<run>/hf at the end of training)"
        )
    path = find_checkpoint(run_dir, ckpt)
    state = load_state_dict(path)
    shadow = ema_weights(path) if use_ema else None
    state.update(shadow or {})  # the EMA weights over the raw ones (the same parameter names)
    method = cfg.method
    extra = {
        "method": str(method._target_).rsplit(".", 1)[-1].lower(),
        "shift_logits": bool(method.get("shift_logits", False)),
        "checkpoint": str(path),
        "ema": bool(shadow),
    }
    return export_hf_folder(cfg, state, out or run_dir / "hf", extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dlm.consolidate", description=consolidate_run.__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--ckpt", default="last", help="last | best | a checkpoint file or DeepSpeed folder")
    parser.add_argument("--out", default=None, help="output folder (default <run_dir>/hf)")
    parser.add_argument("--raw", action="store_true", help="a callbacks=ema run: export the raw weights, not the EMA")
    args = parser.parse_args(argv)
    from dlm.errors import UserError

    with user_errors():
        if args.out is not None:
            from dlm.config import folder_problem

            problem = folder_problem("--out", args.out)
            if problem:
                raise UserError(problem)
        print(f"hf: {consolidate_run(args.run_dir, args.ckpt, args.out, use_ema=not args.raw)}")
