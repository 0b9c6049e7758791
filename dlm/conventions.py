"""A pretrained checkpoint's conventions applied to a run's config: the data's tokenizer, the method's logit shift and
the default sampler come from the model (``model.conventions``, a :class:`~dlm.models.capabilities.ModelConventions`)
unless the user chose otherwise, and a choice that contradicts the model is refused, never silently replaced.

    tokenizer     the data config's tokenizer is a default for models trained from scratch: a pretrained model's
                  ``conventions.tokenizer`` (its checkpoint's own, mask token included) replaces it. A
                  ``data.tokenizer`` given on the command line that differs is refused (the checkpoint's
                  embedding rows are its own tokenizer's ids; another tokenizer would train on scrambled rows).
                  ``model.conventions.tokenizer=null`` opts out.
    shift_logits  ``method.shift_logits: null`` (conf/method/mdlm.yaml, bd3lm.yaml) means the model's convention
                  (no convention: false); an explicit value that contradicts the model's is refused.
    sampler       the model's ``conventions.sampler`` (a conf/sampler option) with ``sampler_fields`` over it
                  replaces the family's default sampler, unless ``sampler=`` was chosen (on the command line or
                  by an experiment); ``sampler.<field>=`` overrides apply on top of the model's sampler. Only for
                  families that sample through a mask sampler (their default sampler takes the MaskPrior).

The config is changed in place before anything is built, so the run folder records what the run used (a run
loaded back with :func:`dlm.run.load_run` rebuilds the same) and a dry run plans with it. The mask token id is
checked against the tokenizer where the tokenizer is loaded (:func:`check_mask_token`, from dlm.build).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from dlm.config import CONF_DIR, ConfigError, group_options, running_hydra_config
from dlm.models.capabilities import ModelConventions

__all__ = ["apply_conventions", "check_mask_token", "model_conventions", "model_tokenizer_node", "sampler_node"]

HF_TOKENIZER = "dlm.data.tokenizers.HFTokenizer"


def model_conventions(cfg: DictConfig) -> ModelConventions:
    """The conventions of cfg.model (none when it declares none: a model built from scratch)."""
    try:
        return ModelConventions.from_config(OmegaConf.select(cfg, "model.conventions", default=None))
    except (ValueError, TypeError) as err:
        raise ConfigError([str(err)]) from err


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _touches(overrides: Sequence[str], key: str) -> bool:
    return any(_key(o) == key or _key(o).startswith(key + ".") for o in overrides)


def model_tokenizer_node(conv: ModelConventions) -> dict[str, Any]:
    """The data.tokenizer config of the model's own tokenizer."""
    node: dict[str, Any] = {"_target_": HF_TOKENIZER, "name_or_path": conv.tokenizer}
    if conv.mask_token is not None:
        node["mask_token"] = conv.mask_token
    return node


def _describe(node: Any) -> str:
    if node is None:
        return "null"
    if not isinstance(node, Mapping):
        return repr(node)
    target = str(node.get("_target_", "?")).rsplit(".", 1)[-1]
    what = node.get("name_or_path") or node.get("alphabet")
    return f"{target}({what})" if what else target


def _same_tokenizer(have: Any, want: Mapping[str, Any]) -> bool:
    if not isinstance(have, Mapping) or have.get("_target_") != want["_target_"]:
        return False
    if str(have.get("name_or_path")) != str(want["name_or_path"]):
        return False
    return have.get("mask_token") in (None, want.get("mask_token"))


def sampler_node(name: str) -> DictConfig:
    """conf/sampler/<name>.yaml with its defaults list merged (read directly, not through Hydra's compose: this
    runs inside a Hydra job, whose global state a compose would reset)."""
    path = CONF_DIR / "sampler" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError([f"model.conventions.sampler={name}: no such option; valid options for sampler: "
                           f"{', '.join(group_options('sampler'))}"])
    node = OmegaConf.load(path)
    merged = OmegaConf.create({})
    for entry in node.pop("defaults", None) or []:
        if entry != "_self_":
            merged = OmegaConf.merge(merged, sampler_node(str(entry)))
    return OmegaConf.merge(merged, node)


def _sampler_chosen(overrides: Sequence[str], choices: Mapping[str, Any]) -> bool:
    """Whether the run's sampler was chosen (``sampler=`` on the command line, or an experiment choosing an option
    other than the family's default ``${method}``), rather than left to the family's default."""
    if any(_key(o) == "sampler" for o in overrides):
        return True
    chosen = choices.get("sampler")
    return chosen is not None and chosen != choices.get("method")


def _hydra_context() -> tuple[list[str], dict[str, Any]]:
    hc = running_hydra_config()
    if hc is None:
        return [], {}
    return list(hc.overrides.task), {str(k): v for k, v in hc.runtime.choices.items()}


def apply_conventions(cfg: DictConfig, overrides: Sequence[str] | None = None,
                      choices: Mapping[str, Any] | None = None) -> list[str]:
    """Fill cfg (in place) from the model's conventions; returns one line per fact taken from the model (printed by
    the CLIs). ``overrides``/``choices``: the command line's overrides and Hydra's group choices (default: the
    running Hydra job's; none outside one, then nothing counts as chosen by the user). Contradictions raise one
    ConfigError naming both sides and the way out."""
    conv = model_conventions(cfg)
    if overrides is None and choices is None:
        overrides, choices = _hydra_context()
    overrides, choices = list(overrides or []), dict(choices or {})
    notes: list[str] = []
    problems: list[str] = []
    with open_dict(cfg):
        if conv.tokenizer and cfg.get("data") is not None:
            _tokenizer(cfg, conv, overrides, notes, problems)
        method = cfg.get("method")
        if method is not None and "shift_logits" in method:
            _shift(cfg, conv, notes, problems)
        if conv.sampler and "sampler" in cfg and not _sampler_chosen(overrides, choices) and _mask_sampling(cfg):
            _sampler(cfg, conv, overrides)
            notes.append(f"sampler: {conv.sampler} (the model's, model.conventions.sampler; sampler=<name> chooses "
                         f"another)")
    if problems:
        raise ConfigError(problems)
    return notes


def _tokenizer(cfg: DictConfig, conv: ModelConventions, overrides: list[str], notes: list[str],
               problems: list[str]) -> None:
    want = model_tokenizer_node(conv)
    have = OmegaConf.to_container(cfg.data.tokenizer, resolve=True) if cfg.data.get("tokenizer") is not None else None
    if _same_tokenizer(have, want):
        return
    if _touches(overrides, "data.tokenizer"):
        problems.append(
            f"data.tokenizer={_describe(have)} differs from the model's own tokenizer {conv.tokenizer} "
            f"(model.conventions.tokenizer, mask {conv.mask_token}): the checkpoint's embedding rows are that "
            f"tokenizer's ids. Drop the data.tokenizer override to use the model's, or set "
            f"model.conventions.tokenizer=null to train this model with another tokenizer")
        return
    cfg.data.tokenizer = want
    notes.append(f"tokenizer: {conv.tokenizer} (the model's own, mask {conv.mask_token or 'its own'}; replaces the "
                 f"data config's {_describe(have)})")


def _shift(cfg: DictConfig, conv: ModelConventions, notes: list[str], problems: list[str]) -> None:
    value = cfg.method.shift_logits
    if value is None:
        cfg.method.shift_logits = bool(conv.shift_logits)
        if conv.shift_logits is not None:
            notes.append(f"method.shift_logits: {str(conv.shift_logits).lower()} (the model's convention)")
    elif conv.shift_logits is not None and bool(value) != conv.shift_logits:
        problems.append(
            f"method.shift_logits={str(bool(value)).lower()} contradicts the model's convention "
            f"model.conventions.shift_logits={str(conv.shift_logits).lower()} (the checkpoint "
            f"{'reads token i from position i-1' if conv.shift_logits else 'reads token i at position i'}): leave "
            f"method.shift_logits unset (null: the model's), or also set model.conventions.shift_logits to retrain "
            f"the convention")


# Whether each shipped sampler class reverses the MaskPrior, by import path, so that the conventions are applied
# without importing dlm.sampling (torch: seconds of a dry run's start-up, issue #17). Exact paths; any other class
# is imported and asked. tests/test_conventions.py checks every entry against its class's `priors`.
MASK_PRIOR_SAMPLERS = {
    "dlm.sampling.ARSampler": False,
    "dlm.sampling.AncestralSampler": True,
    "dlm.sampling.ArgmaxUnrolledSampler": False,
    "dlm.sampling.D3PMSampler": False,
    "dlm.sampling.EntropyBoundedSampler": True,
    "dlm.sampling.EntropySampler": True,
    "dlm.sampling.LowConfidenceSampler": True,
    "dlm.sampling.MarginSampler": True,
    "dlm.sampling.RandomOrderSampler": True,
    "dlm.sampling.ReMDMSampler": True,
    "dlm.sampling.SundaeSampler": False,
    "dlm.sampling.ThresholdSampler": True,
}


def _mask_sampling(cfg: DictConfig) -> bool:
    """Whether the family samples by unmasking an absorbing mask: its own default sampler (the composed sampler
    node) takes the MaskPrior, so a checkpoint's recommended mask sampler can stand in for it. Read from the sampler
    class (MASK_PRIOR_SAMPLERS, else dlm.sampling: no LightningModule is imported, so a dry run stays light)."""
    known = MASK_PRIOR_SAMPLERS.get(str(OmegaConf.select(cfg, "sampler._target_", default="")))
    if known is not None:
        return known
    from hydra.utils import get_class

    from dlm.sampling.prior import MaskPrior

    try:
        sampler = get_class(cfg.sampler._target_)
    except Exception:  # noqa: BLE001 - a bad sampler target is reported where the sampler is built
        return False
    return MaskPrior in getattr(sampler, "priors", ())


def _sampler(cfg: DictConfig, conv: ModelConventions, overrides: list[str]) -> None:
    node = sampler_node(conv.sampler)
    for key, value in (conv.sampler_fields or {}).items():
        node[key] = value
    # the user's sampler.<field>= overrides, as composed, on top of the model's sampler
    for override in overrides:
        key = _key(override)
        if key.startswith("sampler.") and not override.startswith("~"):
            OmegaConf.update(node, key.removeprefix("sampler."), OmegaConf.select(cfg, key), force_add=True)
    cfg.sampler = node


def check_mask_token(conv: ModelConventions, tokenizer, where: str = "data.tokenizer") -> None:
    """The tokenizer's mask token agrees with the model's (``conventions.mask_token`` / ``mask_token_id``)."""
    problems = []
    if conv.mask_token_id is not None and int(tokenizer.mask_token_id) != int(conv.mask_token_id):
        problems.append(
            f"model.conventions.mask_token_id={conv.mask_token_id} but the tokenizer ({where}: "
            f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}) gives its mask token "
            f"{tokenizer.mask_token!r} the id {tokenizer.mask_token_id}: the checkpoint was trained with mask id "
            f"{conv.mask_token_id}; use its own tokenizer (model.conventions.tokenizer) or correct the convention")
    elif conv.mask_token is not None and str(tokenizer.mask_token) != conv.mask_token:
        problems.append(
            f"model.conventions.mask_token={conv.mask_token!r} but the tokenizer ({where}) has mask token "
            f"{tokenizer.mask_token!r} (id {tokenizer.mask_token_id})")
    if problems:
        raise ConfigError(problems)
