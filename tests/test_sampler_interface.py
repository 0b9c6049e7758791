"""The one sampler interface: every config in conf/sampler/ builds, samples through
``sampler.sample(denoiser, x, prior=..., generator=...)`` with each prior it declares, and refuses the others with a
message naming the samplers that take them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from dlm.sampling import (
    ARSampler,
    D3PMPrior,
    FunctionDenoiser,
    MaskPrior,
    PriorMismatchError,
    Sampler,
    ThresholdSampler,
    UniformPrior,
    samplers_for,
)
from dlm.schedules import LinearSchedule
from tests.conftest import compose

CONF = Path(__file__).resolve().parents[1] / "conf" / "sampler"
NAMES = sorted(p.stem for p in CONF.glob("*.yaml"))
V, MASK, T = 7, 6, 10


def denoiser(x: torch.Tensor, t: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(x.sum()) + int(t))
    logits = torch.randn(*x.shape, V, generator=g)
    logits[..., MASK] = float("-inf")
    return logits.log_softmax(-1)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, MASK, (2, T), generator=torch.Generator().manual_seed(0))
    fill = torch.zeros(2, T, dtype=torch.bool)
    fill[0, 3:] = True
    fill[1, 1:8] = True
    return x.masked_fill(fill, MASK), fill


def priors(fill: torch.Tensor) -> dict[type, object]:
    return {
        MaskPrior: MaskPrior(MASK, LinearSchedule()),
        D3PMPrior: D3PMPrior(MASK, lambda t: torch.full((V,), 1.0 - t / 16, dtype=torch.float64), 16),
        UniformPrior: UniformPrior(fill, torch.arange(MASK), MASK),
    }


def build(name: str):
    return instantiate(compose([f"sampler={name}", "logger=none"]).sampler)


@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_config_samples_through_the_one_interface(name):
    sampler = build(name)
    if isinstance(sampler, ARSampler):  # AR decoding is the family's loop (ARSampler's docstring): no sample()
        assert not isinstance(sampler, Sampler) and not hasattr(sampler, "sample")
        return
    assert isinstance(sampler, Sampler) and sampler.priors
    x, fill = inputs()
    available = priors(fill)
    for kind in sampler.priors:
        gen = sampler.sample(denoiser, x, prior=available[kind], generator=torch.Generator().manual_seed(0))
        assert gen.tokens.shape == x.shape and not (gen.tokens == MASK).any(), (name, kind)
        assert torch.equal(gen.tokens[~fill], x[~fill]), (name, kind)  # given tokens are kept
        assert gen.num_network_calls >= 1
    refused = [kind for kind in available if not sampler.accepts(kind)]
    assert refused, f"{name} accepts every prior: the refusal is untested"
    for kind in refused:
        with pytest.raises(PriorMismatchError) as err:
            sampler.sample(denoiser, x, prior=available[kind])
        message = str(err.value)
        assert type(sampler).__name__ in message and kind.__name__ in message
        takers = samplers_for(kind)
        assert takers and all(t in message for t in takers), message


def test_the_priors_have_their_samplers():
    assert "D3PMSampler" in samplers_for(D3PMPrior)
    assert {"SundaeSampler", "ArgmaxUnrolledSampler"} <= set(samplers_for(UniformPrior))
    assert {"AncestralSampler", "ThresholdSampler", "ReMDMSampler"} <= set(samplers_for(MaskPrior))
    assert not set(samplers_for(MaskPrior)) & set(samplers_for(UniformPrior))


def test_a_prior_must_be_a_prior_object():
    x, _ = inputs()
    with pytest.raises(TypeError, match="prior must be"):
        build("ancestral").sample(denoiser, x, prior=MASK)


def test_cache_hooks_are_declared_methods():
    # a plain callable declares no hook; a FunctionDenoiser declares the ones it is given
    x, _ = inputs()
    s = ThresholdSampler(block_length=4, kv_cache="prefix")
    with pytest.raises(ValueError, match="with_prefix_cache"):
        s.sample(denoiser, x, prior=MaskPrior(MASK))
    with pytest.raises(ValueError, match="with_prefix_cache"):  # a dual-cache-only denoiser has no prefix hook
        s.sample(FunctionDenoiser(denoiser, dual_cache=lambda *a: None), x, prior=MaskPrior(MASK))
    hooked = FunctionDenoiser(denoiser, prefix_cache=lambda z, p: (denoiser(z), lambda s: denoiser(s)[:, :]))
    assert hooked.has_prefix_cache and not hooked.has_dual_cache
    gen = s.sample(hooked, x, prior=MaskPrior(MASK))
    assert not (gen.tokens == MASK).any()
    with pytest.raises(NotImplementedError, match="no dual KV cache"):
        hooked.with_dual_cache(x, 0, 1)


def test_a_family_hands_its_prior_and_a_wrong_sampler_is_refused_by_name():
    from test_prefix_cache import MASK as M
    from test_prefix_cache import make_mdlm

    from dlm.methods.mdlm import MDLMDenoiser
    from dlm.sampling import SundaeSampler

    model = make_mdlm()
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    fill = torch.tensor([[False, False, True, True, True, False]])
    with pytest.raises(PriorMismatchError, match="SundaeSampler reverses UniformPrior, not MaskPrior.*AncestralSampler"):
        model.infill(tokens, fill, sampler=SundaeSampler(steps=2))
    with pytest.raises(ValueError, match="not a dlm.sampling.Sampler"):
        model.infill(tokens, fill, sampler=ARSampler())
    gen = model.infill(tokens, fill, sampler=build("ancestral"))
    assert not (gen.tokens == M).any() and torch.equal(gen.tokens[~fill], tokens[~fill])
    # the hooks are declared by MDLM's denoiser where the backbone can cache (the native Transformer can)
    den = MDLMDenoiser(model, initial_masks=torch.tensor([3]))
    assert den.has_prefix_cache and den.has_dual_cache


def test_one_kv_cache_switch_runs_where_the_sampler_or_the_family_runs_it():
    """sampler.kv_cache: null is the family's default (AR, BD3-LM: their exact prefix cache; else none); a mode neither
    the sampler nor the family runs is refused, naming the ones that run."""
    from test_bd3lm import make as make_bd3lm
    from test_prefix_cache import make_mdlm

    from dlm.sampling import AncestralSampler

    mdlm = make_mdlm()
    assert mdlm.kv_cache_of(AncestralSampler()) == "none"
    assert mdlm.kv_cache_of(ThresholdSampler(block_length=2, kv_cache="dual")) == "dual"
    with pytest.raises(ValueError, match="kv_cache=prefix: AncestralSampler under MDLM runs kv_cache=none; the threshold"):
        mdlm.infill(torch.tensor([[1, 2, 3]]), torch.tensor([[False, True, True]]),
                    sampler=AncestralSampler(kv_cache="prefix"))
    bd3 = make_bd3lm(2)
    assert bd3.kv_cache_of(AncestralSampler()) == "prefix" and bd3.kv_cache_of(AncestralSampler(kv_cache="none")) == "none"
    with pytest.raises(ValueError, match="kv_cache=dual: AncestralSampler under BD3LM runs kv_cache=none \\| prefix"):
        make_bd3lm(2, sampler=AncestralSampler(kv_cache="dual"))
    assert ARSampler().kv_cache is None and ARSampler(kv_cache="none").kv_cache == "none"


def test_the_old_kv_cache_keys_are_refused_naming_sampler_kv_cache(run_cfg):
    from dlm.build import build_module, build_sampler
    from dlm.config import ConfigError, explain_override

    for override, new in (("sampler.prefix_cache=true", "sampler.kv_cache=prefix"),
                          ("sampler.dual_cache=true", "sampler.kv_cache=dual"),
                          ("sampler.use_cache=false", "sampler.kv_cache=prefix|none"),
                          ("method.kv_cache=false", "sampler.kv_cache=prefix|none")):
        assert f"was renamed: use {new}" in explain_override(override, ["method=bd3lm"], ValueError())
    with pytest.raises(ConfigError, match="sampler.use_cache was renamed: use sampler.kv_cache=prefix\\|none"):
        build_sampler({"_target_": "dlm.sampling.ARSampler"}, fields={"use_cache": False})
    cfg = run_cfg("method=bd3lm", "+method.kv_cache=true")  # e.g. a run folder saved before the rename
    with pytest.raises(ConfigError, match="method.kv_cache was renamed: use sampler.kv_cache"):
        build_module(cfg, datamodule=None)


def test_sampling_runs_in_eval_mode_and_restores_the_mode_it_found():
    from test_prefix_cache import make_mdlm

    from dlm.methods.base import evaluating
    from dlm.sampling import AncestralSampler

    model = make_mdlm().train()
    seen = []

    class Probe(AncestralSampler):
        def _sample(self, denoiser, x, prior, generator):
            seen.append(model.training)
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        model.infill(torch.tensor([[1, 2, 3]]), torch.tensor([[False, True, True]]), sampler=Probe(steps=2))
    assert seen == [False] and model.training  # eval inside, train again after (an exception too)
    with evaluating(model.eval()):
        assert not model.training
    assert not model.training


def test_ar_checks_its_steps_and_reads_any_samplers_decoding_settings():
    from dlm.methods.ar import decoding_settings
    from dlm.sampling import AncestralSampler

    ARSampler(steps=4)  # composes with a sweep's sampler.steps; one step per token all the same
    with pytest.raises(ValueError, match="steps must be an integer >= 1 or None"):
        ARSampler(steps=0)
    got = decoding_settings(AncestralSampler(temperature=0.5, top_k=3, top_p=0.9))
    assert (got.temperature, got.top_k, got.top_p, got.kv_cache) == (0.5, 3, 0.9, None)
    assert decoding_settings(ARSampler(temperature=0.0, kv_cache="none")).kv_cache == "none"


def test_a_run_folder_saved_with_the_old_kv_cache_keys_still_loads_its_config(tmp_path, capsys):
    """Nothing is lost: a run trained before the rename has its saved keys read as sampler.kv_cache (with a note),
    while a new config naming them is refused (above)."""
    import yaml

    from dlm.config import migrate_renamed_keys
    from dlm.run import load_config

    old = {"method": {"_target_": "dlm.methods.bd3lm.BD3LM", "kv_cache": False},
           "sampler": {"_target_": "dlm.sampling.AncestralSampler", "steps": 8}}
    assert migrate_renamed_keys(old) == ["method.kv_cache (saved by an older dlm) read as sampler.kv_cache=none"]
    assert "kv_cache" not in old["method"] and old["sampler"]["kv_cache"] == "none"
    for sampler, want in (({"use_cache": True}, "prefix"), ({"prefix_cache": True, "dual_cache": False}, "prefix"),
                          ({"prefix_cache": False, "dual_cache": True}, "dual"),
                          ({"prefix_cache": False, "dual_cache": False}, "none")):
        cfg = {"sampler": dict(sampler)}
        assert len(migrate_renamed_keys(cfg)) == 1 and cfg["sampler"] == {"kv_cache": want}
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"method": {"_target_": "dlm.methods.ar.AR"}, "sampler": {"_target_": "dlm.sampling.ARSampler",
                                                                 "use_cache": False}}))
    cfg = load_config(run)
    assert cfg.sampler.kv_cache == "none" and "use_cache" not in cfg.sampler
    assert "sampler.use_cache (saved by an older dlm) read as sampler.kv_cache=none" in capsys.readouterr().err
