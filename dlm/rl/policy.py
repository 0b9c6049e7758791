"""GRPO's policy (dlm/methods/grpo.py): a trained run's family module (``method.init_from``), or a family built
around the composed model (``method.policy``, a node with ``_partial_: true``)."""

from __future__ import annotations

from dlm.errors import UserError
from dlm.methods.base import DiffusionLM


def policy_from_run(init_from: str, ckpt: str, tokenizer) -> DiffusionLM:
    """A trained run's family module (a GRPO run: its policy, so RL continues), weights loaded, in train mode."""
    from dlm.run import load_run  # the run-folder layer: only where a run is the start

    try:
        module = load_run(init_from, ckpt=ckpt, setup_data=False).module
    except UserError as err:  # a ValueError here: the config builder names method (dlm.config.build)
        raise ValueError(f"method.init_from={init_from}: {err}") from err
    if isinstance(getattr(module, "policy", None), DiffusionLM):  # a GRPO run: RL continues from its policy
        module = module.policy
    theirs = (module.tokenizer.vocab_size, module.mask_id, module.eos_id)
    ours = (int(tokenizer.vocab_size), int(tokenizer.mask_token_id), int(tokenizer.eos_token_id))
    if theirs != ours:
        raise ValueError(f"method.init_from={init_from}: the run's tokenizer (vocab {theirs[0]}, mask {theirs[1]}, "
                         f"eos {theirs[2]}) differs from data.tokenizer's (vocab {ours[0]}, mask {ours[1]}, eos "
                         f"{ours[2]}): use the run's data config (data=...) so that validation and samples agree")
    return module.train()


def policy_from_config(policy, backbone, tokenizer, schedule, sampler) -> DiffusionLM:
    if policy is None:
        raise ValueError("method=grpo needs a policy: method.init_from=<run folder> (a trained run) or "
                         "method.policy={_target_: dlm.methods.mdlm.MDLM, _partial_: true, sampler: ...} (a family "
                         "around model=)")
    family = getattr(policy, "func", None)
    if not isinstance(family, type) or not issubclass(family, DiffusionLM):
        raise ValueError(f"method.policy must be a family's node with _partial_: true (a DiffusionLM subclass), "
                         f"got {policy!r}")
    kwargs = {"schedule": schedule} if family.uses_schedule else {}
    if sampler is not None:  # sampler=<option> over the node's own
        kwargs["sampler"] = sampler
    return policy(backbone=backbone, tokenizer=tokenizer, **kwargs)
