"""method=grpo's scale path (dlm/methods/grpo.py, issue 15 item 4): LoRA adapters as the only trained parameters
with the adapter-disabled base as the frozen reference, gradient checkpointing of the policy's training forwards,
the rollout sampler's KV cache (equal rollouts where the family's cache is exact), and a 2-rank ZeRO-3 CPU run whose
ranks draw prompts of different lengths and stop sampling at different calls, and the reference sync under
ZeRO-3 (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_grpo import RL, _metrics, two_rank_rl_run

TESTS = Path(__file__).resolve().parent


def _lora_keys(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The base weights under ``prefix`` by their names without adapters (``.base_layer`` dropped)."""
    from dlm.models.lora import is_adapter_parameter

    return {k.removeprefix(prefix).replace(".base_layer", ""): v for k, v in state.items()
            if k.startswith(prefix) and not is_adapter_parameter(k)}


def _scored_tokens(module, rows: int = 6, prompt_len: int = 3):
    torch.manual_seed(1)
    n = prompt_len + module.completion_length
    tokens = torch.randint(0, module.mask_id, (rows, n))
    scored = torch.zeros_like(tokens, dtype=torch.bool)
    scored[:, prompt_len:] = True
    return tokens, scored, prompt_len


def test_lora_grpo_trains_only_the_adapters_against_the_adapter_disabled_base(run_cfg, tmp_path, workdir, train_cli):
    """init_from a trained run + model.lora.r: only adapters are trainable, no reference copy is kept, the base
    weights stay bit-identical to the run's through RL steps (β > 0), and the reference log-probs are the start's."""
    from conftest import TINY_CLI, run_dir_of
    from hydra.utils import instantiate

    from dlm.build import build_module
    from dlm.models.lora import adapter_count
    from dlm.rl.estimators import MeanFieldLogProb
    from dlm.run import load_run
    from dlm.safe_load import load_checkpoint
    from dlm.train import train

    code, out, err = train_cli(*TINY_CLI)
    assert code == 0, err
    base = run_dir_of(out)
    start = load_checkpoint(base / "checkpoints" / "last.ckpt")["state_dict"]
    cfg = run_cfg(*RL, "trainer.max_steps=3", f"method.init_from={base}", "model.lora.r=4", "method.beta=0.1",
                  "optimizer.lr=1e-2", run_dir=tmp_path / "rl")
    run = train(cfg)
    assert len(_metrics(run, "rl/kl")) == 3
    saved = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert not any(k.startswith("reference.") for k in saved["state_dict"])  # the base is the reference: no copy
    # the checkpoint holds the adapters only (model.lora.checkpoint=adapters): the rebuilt base, checked, fills it
    from dlm.models.lora_checkpoint import restore_base

    restore_base(build_module(cfg, instantiate(cfg.data)), saved, "last.ckpt")
    state = saved["state_dict"]
    kept = _lora_keys(state, "policy.backbone.")
    start_backbone = {k.removeprefix("backbone."): v for k, v in start.items() if k.startswith("backbone.")}
    assert set(kept) == set(start_backbone)
    for name, value in start_backbone.items():
        assert torch.equal(kept[name], value), name  # the base is bit-identical after the RL steps
    lora_b = [v for k, v in state.items() if k.startswith("policy.") and ".lora_B." in k]
    assert lora_b and any(bool(v.abs().sum() > 0) for v in lora_b), "the adapters did not train"

    module = build_module(cfg, instantiate(cfg.data))
    module.load_state_dict(state)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == adapter_count(module.policy.backbone) > 0
    assert module.reference is None
    start_module = load_run(base, setup_data=False).module.eval()
    module.eval()
    tokens, scored, P = _scored_tokens(module)
    estimator = MeanFieldLogProb(p_mask_prompt=0.0)
    with torch.no_grad(), module._reference() as reference:
        ref = estimator(reference, tokens, scored, P).logp
    with torch.no_grad():
        expected = estimator(start_module, tokens, scored, P).logp
        adapted = estimator(module.policy, tokens, scored, P).logp
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-6)  # the reference is the start, adapters off
    assert not torch.allclose(adapted, expected, atol=1e-4)  # ... and the adapters are back on after the block


def test_lora_policy_from_config_builds_no_reference_copy(run_cfg):
    from hydra.utils import instantiate

    from dlm.build import build_module
    from dlm.models.lora import adapter_count

    cfg = run_cfg(*RL, "model.lora.r=4", "method.beta=0.05")
    module = build_module(cfg, instantiate(cfg.data))
    assert module.reference is None and module.tracks_reference
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert trainable == adapter_count(module.backbone) > 0
    without = build_module(run_cfg(*RL, "method.beta=0.05"), instantiate(cfg.data))
    assert without.reference is not None  # no adapters: the frozen copy of the start, as before
    saved = build_module(run_cfg(*RL, "model.lora.r=4", "model.lora.modules_to_save=[tok_emb]", "method.beta=0.05"),
                         instantiate(cfg.data))
    assert saved.reference is not None  # the embedding trains in full: the base is no longer the start, a copy is
    assert not any(p.requires_grad for p in saved.reference.parameters())


HF_POLICY = ["model=qwen3_tiny", "method.completion_length=8"]


def test_gradient_checkpointing_reruns_the_policy_layers_in_the_backward_with_the_same_gradients(run_cfg):
    """model.gradient_checkpointing=true: the policy's training forward (the estimator, in train mode) is
    checkpointed (each decoder layer runs again in the backward) and gives the gradients of the plain forward."""
    from hydra.utils import instantiate

    from dlm.build import build_module

    grads, calls = {}, {}
    for checkpointing in (False, True):
        cfg = run_cfg(*RL, *HF_POLICY, f"model.gradient_checkpointing={str(checkpointing).lower()}")
        torch.manual_seed(0)
        module = build_module(cfg, instantiate(cfg.data)).train()
        # a pre-hook inside the layer: transformers' checkpointing recomputes the layer's forward (not its hooked
        # call), and torch's recomputation stops early once the saved tensors are back (a post-hook may not fire)
        attention = module.policy.backbone.hf_model.model.layers[0].self_attn
        count = [0]
        attention.register_forward_pre_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        tokens, scored, P = _scored_tokens(module)
        est = module.estimator(module.policy, tokens, scored, P, generator=torch.Generator().manual_seed(0))
        est.logp.sum().backward()
        calls[checkpointing] = count[0]
        grads[checkpointing] = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}
    assert calls == {False: 1, True: 2}
    assert grads[False].keys() == grads[True].keys() and grads[False]
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, msg=name)


# the rollout sampler's KV cache where the family's cache is exact: BD3-LM's of finished blocks, AR's
CACHED = {
    "bd3lm": ["method.policy._target_=dlm.methods.bd3lm.BD3LM", "+method.policy.block_size=4", "sampler=ancestral",
              "prompts.conditional=true"],
    "ar": ["method.policy._target_=dlm.methods.ar.AR", "~method.policy.sampler", "sampler=ar", "sampler.steps=null",
           "prompts.conditional=true"],
}


@pytest.mark.parametrize("family", sorted(CACHED))
def test_rollouts_with_the_kv_cache_equal_those_without(run_cfg, tmp_path, family):
    from dlm.train import train

    texts = {}
    for cache in ("prefix", "none"):
        run = train(run_cfg(*RL, *CACHED[family], f"sampler.kv_cache={cache}", "trainer.max_steps=2",
                            run_dir=tmp_path / cache))
        texts[cache] = [json.loads(line)["text"] for line in open(run / "samples.jsonl") if '"rollout"' in line]
    assert len(texts["prefix"]) == 2 * 16
    assert texts["prefix"] == texts["none"]  # both generations: the same rollouts, so the same update between them


def test_rollouts_run_under_the_threshold_samplers_dual_cache(run_cfg):
    """MDLM with Fast-dLLM's dual cache for the rollouts (approximate under bidirectional attention: runs, not equal)."""
    from dlm.train import train

    run = train(run_cfg(*RL, "sampler=threshold", "sampler.kv_cache=dual", "sampler.block_length=4",
                        "prompts.conditional=true", "trainer.max_steps=1"))
    assert len(_metrics(run, "rl/reward_mean")) == 1


@pytest.mark.slow
@pytest.mark.parametrize("extra", [pytest.param([], id="reference-copy"),
                                   pytest.param(["model.lora.r=4"], id="lora-base-reference"),
                                   pytest.param("pretrained", id="pretrained-into-partitions")])
def test_two_rank_zero3_cpu_run_of_a_few_rl_steps(tmp_path, extra):
    """ZeRO-3 on 2 CPU ranks: conditional prompts (lengths differ between the ranks, so a rank trains dummy buckets)
    and the ancestral sampler skipping calls that reveal nothing (the ranks' call counts differ), μ = 2 and β > 0
    (old and reference log-probs). Without the lockstep the ranks' parameter gathers do not pair up and the run
    hangs (checked once by disabling it: both ranks waited in a collective after the first rollouts).
    ``pretrained``: an HF checkpoint loaded straight into the partitions (the deferred backbone becomes the policy's
    and the reference is a second build of it)."""
    if extra == "pretrained":
        from tiny_checkpoint import tiny_model_overrides, write_tiny_checkpoint

        extra = tiny_model_overrides(write_tiny_checkpoint(tmp_path / "pretrained"))
    run, proc = two_rank_rl_run(tmp_path, "deepspeed", "prompts.conditional=true", "method.num_iterations=2",
                                "method.beta=0.05", "sampler.steps=8", *extra, timeout=900)
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed" and results["global_step"] == 3
    assert len(_metrics(run, "rl/reward_mean")) == 3 and len(_metrics(run, "rl/kl")) == 3
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list((ckpt / "checkpoint").glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    if any(a.startswith("model.pretrained=") for a in extra):
        # the deferred builds on each rank: the policy's backbone and the reference's second one
        assert proc.stdout.count("into ZeRO-3 partitions") == 4, proc.stdout[-2000:]


@pytest.mark.slow
def test_two_rank_zero3_reference_sync_mixes_the_gathered_policy_into_the_shards(tmp_path):
    """TRL's reference sync under ZeRO-3 on 2 CPU ranks: each policy/reference pair is gathered, mixed and the result
    re-partitioned. With alpha = 1 every step, the consolidated last checkpoint's reference equals its policy, every
    parameter (a pair mixed into the wrong shard, or one rank's half only, would not)."""
    from dlm.parallel.checkpoint import load_state_dict

    run, _ = two_rank_rl_run(tmp_path, "deepspeed", "method.beta=0.05", "method.ref_sync_every=1",
                             "method.ref_mixup_alpha=1.0", timeout=900)
    assert json.loads((run / "results.json").read_text())["global_step"] == 3
    state = load_state_dict(run / "checkpoints" / "last.ckpt")
    refs = {k.removeprefix("reference."): v for k, v in state.items() if k.startswith("reference.")}
    assert refs and all(torch.equal(v, state["policy." + k]) for k, v in refs.items())


def test_an_instruct_checkpoints_prompts_go_through_its_chat_template(run_cfg, tmp_path):
    """As d1 and dlm.generate do: a checkpoint whose conventions carry a chat template gets each prompt as one user
    message through it (method.chat_prompts=null); false sends the raw text."""
    from hydra.utils import instantiate
    from tiny_checkpoint import tiny_model_overrides, write_tiny_checkpoint

    from dlm.build import build_module
    from dlm.conventions import apply_conventions
    from dlm.data.chat import chat_ids

    ckpt = write_tiny_checkpoint(tmp_path / "instruct", chat=True)
    common = [*RL, *tiny_model_overrides(ckpt, chat_template=True), "prompts.conditional=true"]
    for chat, expect_template in ((None, True), (False, False)):
        cfg = run_cfg(*common, *([] if chat is None else [f"method.chat_prompts={str(chat).lower()}"]))
        apply_conventions(cfg, overrides=[])  # the checkpoint's tokenizer, as the training CLI applies it
        module = build_module(cfg, instantiate(cfg.data))
        tok = module.tokenizer
        plain = tok.encode("(([")
        templated = chat_ids(tok, [{"role": "user", "content": "((["}])
        assert templated != plain and tok.decode(templated).startswith("user:")
        assert module._encode_prompt("(([") == (templated if expect_template else plain)
        assert module._encode_prompt("") == []  # an unconditional prompt stays empty
