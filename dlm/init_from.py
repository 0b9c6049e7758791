"""Start a new training run from a trained run's weights: ``init_from=<run folder>`` (``init_ckpt``: last, best or a
.ckpt path), for any family and backbone.

    python -m dlm.train data=instructions 'data.source.kinds=[close,reverse]' data.completion_only_loss=false  # a base
    python -m dlm.train data=instructions init_from=<that run_dir> model.lora.r=8 optimizer.lr=3e-3            # SFT

What it is: a fresh run (step 0, a fresh optimizer, schedule and data stream; its own run folder) whose backbone
starts at the run's. HF models have ``model.pretrained`` and GRPO ``method.init_from``; this is the same start for
dlm's own models. What comes from the run, and what is refused:

- **The model config is the run's.** A command that does not set ``model=`` / ``model.*`` takes the run's
  ``model`` node (printed); one that does must build the run's geometry, else it is refused naming the differing
  keys. ``model.lora`` is the new run's own: the adapters are added *after* the weights load, so LoRA trains on the
  run's weights, which stay frozen and bit-identical.
- **The tokenizer is the run's** (a checkpoint brings its tokenizer and mask token; DESIGN "conventions"): the data's
  tokenizer must be the same vocabulary, token for token, with the same EOS and mask ids, else it is refused naming
  both. A different family is fine when the backbone fits (an ``mdlm`` base fine-tuned as ``bd3lm`` or ``ar``: the
  families set the attention pattern at call time, not in the weights).
- **Weights**: through :func:`dlm.run.load_run` (``dlm.safe_load``, weights_only) -- its EMA weights where it had
  EMA (what its validation measured), a LoRA run's adapters merged into its base, a GRPO run's policy.
- ``ckpt_path`` stays the resume: ``init_from=... ckpt_path=last`` resumes the new run from its own checkpoint (the
  weights come from there; the run named by init_from is read for its model config only).

The new run's ``.hydra/config.yaml`` records ``init_from`` and the adopted model config; loading it
(``dlm.run.load_run``) or resuming it reads the run it started from first (a LoRA checkpoint may hold the adapters
only), so keep that run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dlm.config import ConfigError

__all__ = ["InitFromError", "adopt_run_model", "init_backbone", "check_same_tokenizer"]


class InitFromError(ConfigError):
    """init_from names a run whose model or tokenizer this command cannot start from."""


def _model_overrides(overrides: Sequence[str]) -> list[str]:
    """The command line's model choices (``model=``, ``model.*``), the new run's adapters (``model.lora.*``) aside."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    return [k for k in keys if (k == "model" or k.startswith("model.")) and k != "model.lora"
            and not k.startswith("model.lora.")]


def _without_lora(node: Any) -> dict:
    plain = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else dict(node or {})
    plain.pop("lora", None)
    return plain


def _differences(now: dict, then: dict) -> list[str]:
    return [f"model.{k}: {then.get(k)!r} in the run, {now.get(k)!r} now" for k in sorted(set(now) | set(then), key=str)
            if now.get(k) != then.get(k)]


def adopt_run_model(cfg: DictConfig, load_config: Callable, overrides: Sequence[str] | None = None) -> list[str]:
    """With ``cfg.init_from`` set: make ``cfg.model`` the run's model config (in place; ``model.lora`` kept), or
    refuse when the command chose a model that differs. ``load_config``: dlm.run's (passed in: the run-folder layer
    imports this module, not the other way round). ``overrides``: the command line's (default: the running Hydra
    job's). Returns the notes to print; nothing without init_from."""
    init = cfg.get("init_from")
    if not init:
        return []

    if overrides is None:
        from dlm.config import running_hydra_config

        hc = running_hydra_config()
        overrides = list(hc.overrides.task) if hc is not None else []
    try:
        theirs = _without_lora(load_config(init).model)
    except (FileNotFoundError, KeyError) as err:  # NotARunError is a FileNotFoundError
        raise InitFromError([f"init_from={init}: {err}"]) from err
    ours = _without_lora(cfg.model)
    differences = _differences(ours, theirs)
    if not differences:
        return []
    chosen = _model_overrides(overrides)
    if chosen:
        raise InitFromError([f"init_from={init}: the command's model ({', '.join(chosen)}) builds another geometry than "
                             f"the run's; drop the model overrides (the run's model config is then used) or match "
                             f"the run:", *differences[:8]])
    lora = cfg.model.get("lora") if cfg.get("model") is not None else None
    adopted = OmegaConf.create(theirs)
    if lora is not None:
        adopted.lora = OmegaConf.to_container(lora, resolve=False)
    with open_dict(cfg):
        cfg.model = adopted
    keys = ", ".join(d.split(":", 1)[0] for d in differences[:6]) + (" ..." if len(differences) > 6 else "")
    return [f"the model config is the run's ({init}; differs from the composed one in {keys})"]


def _token_strings(tokenizer) -> list[str]:
    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is not None:
        return list(hf.convert_ids_to_tokens(list(range(len(hf)))))
    return [tokenizer.decode([i], skip_special_tokens=False) for i in range(int(tokenizer.vocab_size))]


def check_same_tokenizer(init: str, theirs, ours) -> None:
    """Refuse (naming both) a data tokenizer that is not the run's: another vocabulary size, special ids or any
    token string."""
    ids = ("vocab_size", "eos_token_id", "mask_token_id", "pad_token_id")
    a = {k: getattr(theirs, k, None) for k in ids}
    b = {k: getattr(ours, k, None) for k in ids}
    problems = [f"{k}: {a[k]} in the run, {b[k]} in data.tokenizer" for k in ids if a[k] != b[k]]
    if not problems:
        mine, yours = _token_strings(theirs), _token_strings(ours)
        diff = next((i for i, (x, y) in enumerate(zip(mine, yours)) if x != y), None)
        if diff is not None or len(mine) != len(yours):
            problems.append(f"token {diff}: {mine[diff]!r} in the run, {yours[diff]!r} in data.tokenizer"
                            if diff is not None else f"{len(mine)} tokens in the run, {len(yours)} in data.tokenizer")
    if problems:
        raise InitFromError([f"init_from={init}: the run's tokenizer {theirs!r} is not data.tokenizer {ours!r} (a "
                             f"checkpoint brings its tokenizer); use the run's data.tokenizer:", *problems[:4]])


def _run_backbone(init: str, ckpt: str | None, load_run: Callable):
    """The run's backbone with its trained weights (EMA where recorded; a LoRA run's adapters merged; a GRPO run's
    policy), and the run's tokenizer."""
    from dlm.models.lora import adapter_spec
    from dlm.models.lora_export import merge_adapters

    run = load_run(init, ckpt=ckpt or "last", setup_data=False)
    module = getattr(run.module, "policy", run.module)  # method=grpo: the family it trained
    backbone = module.backbone
    if adapter_spec(backbone) is not None:
        merge_adapters(backbone)  # the model its adapters made, with the plain parameter names
    return backbone, module.tokenizer


def init_backbone(cfg: DictConfig, tokenizer, load_run: Callable):
    """The new run's backbone: built from ``cfg.model`` without adapters, the run's weights loaded (every tensor, same
    shapes, else refused naming them; ``load_run``: dlm.run's), then ``model.lora``'s adapters added (the base
    frozen)."""
    from dlm.config import build
    from dlm.models.lora import add_adapters, split_lora

    init = cfg.init_from
    node, spec = split_lora(cfg.model)
    if spec is not None and spec.quantize:
        raise InitFromError([f"init_from={init} with model.lora.quantize={spec.quantize}: a 4-bit base loads from an HF "
                             f"checkpoint (model.pretrained), not from a run; export the run (its hf/ folder) and "
                             f"point model.pretrained at it"])
    source, theirs = _run_backbone(init, cfg.get("init_ckpt"), load_run)
    check_same_tokenizer(init, theirs, tokenizer)
    backbone = build(node, "model", vocab_size=tokenizer.vocab_size)
    state = source.state_dict()
    live = backbone.state_dict()
    problems = [f"{k}: {list(state[k].shape)} in the run, {list(v.shape)} now" for k, v in live.items()
                if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems += [f"{k}: not in the run's backbone" for k in live if k not in state]
    problems += [f"{k}: in the run's backbone, not in this one" for k in state if k not in live]
    if problems:
        raise InitFromError([f"init_from={init}: the run's backbone ({type(source).__name__}) does not fit the one "
                             f"model= builds ({type(backbone).__name__}); {len(problems)} tensors differ:",
                             *problems[:6]])
    backbone.load_state_dict(state, strict=True)
    return backbone if spec is None else add_adapters(backbone, spec)
