"""A run's checkpoint (a DeepSpeed ZeRO folder or a Lightning file) as an HF-format folder (config.json +
safetensors) that transformers and dlm load: ``python -m dlm.consolidate <run_dir>`` (dlm/consolidate.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dlm.errors import UserError
from dlm.parallel.checkpoint import ema_weights, load_state_dict
from dlm.run import find_checkpoint, load_config, resolve_run_path


def export_hf_folder(cfg, state_dict: dict[str, torch.Tensor], out: str | Path, extra: dict | None = None) -> Path:
    """Write an HF-format folder (config.json + safetensors) for the HFCausalLM backbone of a run's config, with
    the weights of ``state_dict`` (keys ``backbone.hf_model.*``). The model is built on the meta device, so no
    second copy of the weights is allocated and nothing is downloaded beyond the checkpoint's config."""

    from dlm.models.hf import HFCausalLM, pretrained_geometry  # lazily: start-up: transformers
    from dlm.models.lora import split_lora

    model_cfg, lora = split_lora(cfg.model)
    if not is_hf_backbone(model_cfg):
        raise ValueError(f"consolidation to an HF folder needs an HFCausalLM model, not {model_cfg.get('_target_')}")
    prefix = "backbone.hf_model."
    if lora is not None and lora.export == "merged" and not lora.quantize and is_hf_backbone(model_cfg, published=True):
        from dlm.models.lora_export import merged_state

        if lora.target_parameters:  # their layout needs the adapted model, which a published layout is not built as
            raise ValueError("model.lora.target_parameters on a published model: merge the adapter folder with peft "
                             "(model.lora.export=adapter, then PeftModel.from_pretrained(...).merge_and_unload())")
        # a published DLM's layers are all nn.Linear (no Conv1D): merge, then write its own layout
        state_dict = merged_state(state_dict, lora.scaling, fan_in_fan_out=False)
        extra = {**(extra or {}), "lora": {"r": lora.r, "alpha": lora.alpha, "export": lora.export}}
        lora = None
    hf_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not hf_state:
        raise ValueError(f"no {prefix}* weights in the checkpoint (keys start {list(state_dict)[:3]})")
    if is_hf_backbone(model_cfg, published=True):  # a published DLM goes back into its own layout
        return _export_published(model_cfg, hf_state, out, extra)
    geometry = dict(OmegaConf.to_container(model_cfg.config, resolve=True)) if model_cfg.get("config") else {}
    if model_cfg.get("pretrained"):
        geometry = {**pretrained_geometry(model_cfg.pretrained), **geometry}
    model_cfg = OmegaConf.merge(model_cfg, {"pretrained": None, "gradient_checkpointing": False})
    model_cfg.config = geometry
    if lora is not None:
        return _export_adapters(model_cfg, lora, state_dict, out, cfg.model.get("pretrained"), extra)
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


def is_hf_backbone(model_cfg, published: bool = False) -> bool:
    """Whether a model config builds an HFCausalLM (``published``: a dlm.models.zoo.PublishedDLM), by its class."""
    from hydra.utils import get_class

    target = model_cfg.get("_target_")
    if published and not str(target).startswith("dlm.models.zoo"):
        return False  # not imported for the plain HF runs
    try:
        cls = get_class(target)
    except Exception:  # noqa: BLE001 - not a class path (a function, a typo): not an HF backbone
        return False
    from dlm.models.hf import HFCausalLM

    if published:
        from dlm.models.zoo import PublishedDLM

        return isinstance(cls, type) and issubclass(cls, PublishedDLM)
    return isinstance(cls, type) and issubclass(cls, HFCausalLM)


def _export_published(model_cfg, hf_state: dict[str, torch.Tensor], out, extra: dict | None) -> Path:
    """The run's weights in the checkpoint's published layout (config.json keys, weight names, sharded index, the
    source folder's tokenizer and code files): the architecture is built on the meta device from config.json."""
    model_cfg = OmegaConf.merge(model_cfg, {"load_weights": False, "gradient_checkpointing": False})
    with torch.device("meta"):
        backbone = instantiate(model_cfg, vocab_size=None)
    out = backbone.save_published(out, state=hf_state)
    (Path(out) / "dlm_export.json").write_text(json.dumps(extra or {}, indent=2) + "\n")
    return Path(out)


def _export_adapters(model_cfg, lora, state_dict: dict[str, torch.Tensor], out: str | Path, base: str | None,
                     extra: dict | None) -> Path:
    """A LoRA run's export (dlm/models/lora_export.py): the adapters merged into the weights as a plain HF folder
    (``model.lora.export=merged``), or peft's adapter folder for the run's base (``adapter``)."""
    from dlm.models.lora import add_adapters
    from dlm.models.lora_export import merged_state, parameter_adapters, peft_config_of, save_adapter_folder

    with torch.device("meta"):  # the adapted model's layout (which layers, Conv1D or Linear), no weights
        adapted = add_adapters(instantiate(model_cfg, vocab_size=None), lora)
    extra = {**(extra or {}), "lora": {"r": lora.r, "alpha": lora.alpha, "export": lora.export}}
    if lora.export == "adapter" or lora.quantize:  # QLoRA: the checkpoint's base is 4-bit; merge onto the 16-bit one
        if lora.export != "adapter":                # with peft (PeftModel.from_pretrained(base, out).merge_and_unload())
            print(f"export: model.lora.quantize={lora.quantize}: the adapter folder, not a merged model (the base in the "
                  f"checkpoint is quantized; merge onto the 16-bit base with peft's merge_and_unload)")
        prefix = "backbone."
        backbone_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        return save_adapter_folder(adapted, backbone_state, out, base=base, extra=extra)
    config = peft_config_of(adapted)
    merged = merged_state(state_dict, lora.scaling, config.fan_in_fan_out, parameter_adapters(adapted, "backbone."))
    return export_hf_folder(OmegaConf.create({"model": model_cfg}), merged, out, extra)


def consolidate_run(run_dir: str | Path, ckpt: str = "last", out: str | Path | None = None,
                    use_ema: bool = True) -> Path:
    """A run's checkpoint (``last``, ``best`` or a path; a DeepSpeed folder or a file) -> ``<run_dir>/hf``; a run
    trained with ``callbacks=ema`` exports its EMA weights unless ``use_ema=False``."""

    run_dir, _ = resolve_run_path(run_dir)  # NotARunError (one line) for anything but a run folder
    cfg = load_config(run_dir)
    target = cfg.model.get("_target_")
    if not is_hf_backbone(cfg.model):  # say so before reading a checkpoint that cannot be exported
        raise UserError(
            f"dlm.consolidate exports runs whose model is an HF backbone (model._target_=dlm.models.hf.HFCausalLM); "
            f"{run_dir} has model._target_={target}. Use the run folder itself instead: dlm.generate run=<run>, "
            f"dlm.evaluate run=<run> and dlm.run.load_run read its checkpoint as it is (an AR run also writes "
            f"<run>/hf at the end of training)"
        )
    path = find_checkpoint(run_dir, ckpt)
    from dlm.models.lora_checkpoint import is_adapter_only

    if is_adapter_only(path):  # LoRA adapters only: the run's model rebuilt around them (its base checked)
        from dlm.run import load_run

        shadow = ema_weights(path) if use_ema else None
        state = load_run(run_dir, ckpt=path, setup_data=False, use_ema=use_ema).module.state_dict()
    else:
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
    folder = export_hf_folder(cfg, state, out or run_dir / "hf", extra)
    save_run_tokenizer(cfg, folder)
    return folder


def save_run_tokenizer(cfg, folder: Path) -> None:
    """The run's HF tokenizer (mask token included) beside the weights, so that the export is a checkpoint that
    brings its tokenizer (model.conventions.tokenizer: ${..pretrained} reads it back, dlm/conventions.py). A
    character or byte tokenizer has no files: the run folder around <run>/hf answers for it (dlm.generate)."""
    tokenizer = instantiate(cfg.data.tokenizer)
    if hasattr(tokenizer, "hf_tokenizer"):
        try:
            tokenizer.hf_tokenizer.save_pretrained(str(folder))
        except OSError as err:  # not loadable here (offline hub id): the export stays usable with an explicit one
            print(f"export: tokenizer not saved with the weights ({err})")
