"""Every published DLM end to end, from a tiny checkpoint in its own layout (tests/test_zoo_models.py writes them):
straight from its model config (dlm.run.load_model, no run folder) it samples with every mask sampler (caches
included), `dlm.evaluate model=...` and the lm-eval adapter score it, and a few CPU training steps export it back
into its published layout (the MoE layouts here; LLaDA and Dream in test_zoo_models)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_zoo_models import ARCHS, VOCAB, WORDS, _train, load_backbone, write_checkpoint

from dlm.build import build_sampler, sampler_config
from dlm.run import load_model

# Every conf/sampler option that unmasks an absorbing mask, with the caches they run (MDLM around a zoo model).
MASK_SAMPLERS = [("ancestral", {}), ("low_confidence", {"block_length": 4}), ("margin", {}), ("entropy", {}),
                 ("random_order", {}), ("remdm", {}), ("entropy_bounded", {}), ("threshold", {}),
                 ("threshold", {"kv_cache": "prefix", "block_length": 4}),
                 ("threshold", {"kv_cache": "dual", "block_length": 4})]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_e2e")
    corpus = root / "corpus.txt"
    gen = torch.Generator().manual_seed(0)
    corpus.write_text("\n\n".join(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (12,), generator=gen))
                                  for _ in range(40)))
    folders = {arch: root / arch for arch in ARCHS}
    for i, (arch, folder) in enumerate(folders.items()):
        write_checkpoint(folder, arch, seed=i)
    return folders, corpus


def overrides(folder, corpus) -> list[str]:
    return [f"model.pretrained={folder}", f"model.conventions.mask_token_id={VOCAB - 1}", "model.torch_dtype=float32",
            "data=text_files", f"data.source.paths={corpus}", "data.seq_len=16", "data.batch_size=4"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_zoo_model_samples_with_every_mask_sampler(arch, zoo):
    folders, corpus = zoo
    run = load_model(ARCHS[arch][0], overrides(folders[arch], corpus))
    module = run.module
    assert module.shift_logits is (arch in ("dream", "rnd1"))  # the checkpoint's convention, not the method's
    prompt = torch.tensor([[3, 5, 7]])
    for name, fields in MASK_SAMPLERS:
        sampler = build_sampler(sampler_config(name), steps=4, fields=fields)
        out = module.generate(prompt, 8, sampler, generator=torch.Generator().manual_seed(0))
        tokens = out.tokens
        assert tokens.shape == (1, 11) and (tokens[:, :3] == prompt).all(), (name, fields)
        assert not (tokens == module.mask_id).any() and 1 <= out.num_network_calls <= 8, (name, fields, out.num_network_calls)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_dlm_evaluate_and_lm_eval_score_a_zoo_model(arch, zoo, run_cli, tmp_path, monkeypatch):
    from lm_eval.api.instance import Instance

    from dlm.evaluate import main
    from dlm.lm_eval_model import DLMHarnessModel

    folders, corpus = zoo
    args = overrides(folders[arch], corpus)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(main, f"model={ARCHS[arch][0]}", *args, "num_mc=1", "samples.num_unconditional=1",
                             "samples.num_prompted=1", "samples.num_infill=1", "progress_bar=false")
    assert code == 0, err[-3000:]
    metrics = json.loads((tmp_path / "evals" / f"mdlm-{ARCHS[arch][0]}" / "results.json").read_text())
    # a random model over VOCAB tokens: its bound is finite and above zero
    assert 0 < metrics["eval/nll_bound"] < 10 * math.log(VOCAB)
    model_args = dict(a.split("=", 1) for a in args if a.startswith("model."))
    harness = DLMHarnessModel(model=ARCHS[arch][0], mc_num=2, batch_size=2, device="cpu", **model_args)
    (ll, _), = harness.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=("w1 w2", " w3"),
                                               idx=0)])
    assert math.isfinite(ll) and ll <= 0


@pytest.mark.parametrize("arch", ["llada_moe", "rnd1"])
def test_a_moe_zoo_model_trains_and_exports_its_published_layout(arch, zoo, train_cli, tmp_path):
    from dlm.parallel.checkpoint import load_state_dict
    from dlm.run import find_checkpoint

    folders, _ = zoo
    run = _train(train_cli, arch, folders[arch], tmp_path)
    config = json.loads((run / "hf" / "config.json").read_text())
    assert config["model_type"] == ARCHS[arch][1]["model_type"] and config["auto_map"] == ARCHS[arch][1]["auto_map"]
    backbone, _ = load_backbone(arch, run / "hf")  # the published layout again, with the trained weights
    trained = load_state_dict(find_checkpoint(run, "last"))
    for k, v in backbone.hf_model.state_dict().items():
        assert torch.equal(v, trained[f"backbone.hf_model.{k}"].to(v.dtype)), k
