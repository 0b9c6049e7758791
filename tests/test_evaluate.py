"""dlm.run.load_run and dlm.evaluate: the bound with K Monte-Carlo draws, samples, gen PPL, results.json."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_analysis import make_tiny_sweep

from dlm.evaluate import evaluate
from dlm.gen_perplexity import HFScorer, generative_perplexity
from dlm.likelihood import likelihood
from dlm.run import NotARunError, load_run
from dlm.safe_load import load_checkpoint


@pytest.fixture
def run_dir(tmp_path_factory, tmp_path) -> Path:
    """A finished tiny run, copied (a moved run folder must still load; the evaluation writes into it)."""
    sweep = make_tiny_sweep(tmp_path_factory.getbasetemp())
    return Path(shutil.copytree(sweep / "0", tmp_path / "run"))


def compose_eval(*overrides: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dlm.config import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_load_run_from_folder_or_checkpoint(run_dir):
    run = load_run(run_dir)
    assert run.cfg.paths.run_dir == str(run_dir.resolve()) and run.cfg.name == "mdlm-tiny"
    assert run.choices["schedule"] == "linear" and not run.module.training
    again = load_run(run_dir / "checkpoints" / "last.ckpt")
    for key, value in run.module.state_dict().items():
        torch.testing.assert_close(value, again.module.state_dict()[key])
    saved = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert saved.keys() == run.module.state_dict().keys()
    for key, value in saved.items():
        torch.testing.assert_close(run.module.state_dict()[key], value)


def test_not_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(NotARunError, match="no such file"):
        load_run(tmp_path / "missing")
    with pytest.raises(NotARunError, match="not a run folder"):
        load_run(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotARunError, match="Hugging Face"):
        load_run(tmp_path)


def test_bound_is_reproducible_and_has_a_monte_carlo_error(run_dir):
    run = load_run(run_dir)
    loader = run.datamodule.val_dataloader()
    a = likelihood(run.module, loader, num_mc=3, seed=0, max_batches=2)
    b = likelihood(run.module, loader, num_mc=3, seed=0, max_batches=2)
    assert a == b
    assert a["nll_bound_num_mc"] == 3 and a["nll_bound_tokens"] == 2 * 16 * 16
    assert a["nll_bound_stderr"] > 0 and a["nll_bound_stderr_data"] > 0
    assert a["ppl_bound"] == pytest.approx(math.exp(a["nll_bound"]))
    # draw 0 equals a single-draw estimate with the same seed
    one = likelihood(run.module, loader, num_mc=1, seed=0, max_batches=2)
    assert one["nll_bound_stderr"] == 0.0 and one["nll_bound"] != a["nll_bound"]


class _Family:
    """Stand-ins for families: one with an exact NLL (AR), one without a bound (SUNDAE)."""

    compute_device = torch.device("cpu")

    def __init__(self, exact: bool, raises: bool = False):
        self.exact_nll = exact
        self.raises = raises
        self.calls = 0

    def nll_bound(self, batch, generator=None):
        if self.raises:
            raise NotImplementedError("SUNDAE has no tractable likelihood bound; compare gen PPL instead")
        self.calls += 1
        return batch["loss_mask"].float() * 2.0


def test_exact_families_are_evaluated_once_and_boundless_ones_say_why():
    batches = [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "loss_mask": torch.ones(2, 4, dtype=torch.bool)}]
    exact = _Family(exact=True)
    out = likelihood(exact, batches, num_mc=8)
    assert exact.calls == 1 and out["nll_bound"] == 2.0 and out["nll_bound_exact"] and out["nll_bound_stderr"] == 0
    out = likelihood(_Family(exact=False, raises=True), batches, num_mc=8)
    assert out["nll_bound"] is None and "SUNDAE" in out["nll_bound_error"]


def test_evaluate_merges_into_results_json(run_dir):
    before = json.loads((run_dir / "results.json").read_text())
    cfg = compose_eval(f"run={run_dir}", "num_mc=2", "max_batches=1", "samples.num_unconditional=4",
                       "samples.num_prompted=2", "samples.num_infill=2", "steps=2", "wandb=off",
                       f"scorer={run_dir}")
    metrics, path = evaluate(cfg)
    assert path == run_dir / "results.json"
    results = json.loads(path.read_text())
    assert results["val/nll_bound"] == before["val/nll_bound"]  # the training results stay
    assert results["eval/nll_bound_num_mc"] == 2 and results["eval/nll_bound"] > 0
    assert results["eval/sampler/steps"] == 2 and results["eval/sample/network_calls"] <= 2
    assert 0 <= results["eval/sample/valid_frac"] <= 1 and "eval/sample/unigram_entropy" in results
    assert results["eval/gen_ppl_scorer"] == str(run_dir.resolve()) and not results["eval/gen_ppl_exact"]
    assert (run_dir / "eval_samples.jsonl").is_file()
    # a second evaluation with another sampler replaces eval/ keys and is appended to eval.jsonl
    cfg = compose_eval(f"run={run_dir}", "likelihood=false", "samples.num_unconditional=2",
                       "samples.num_prompted=0", "samples.num_infill=0", "sampler=low_confidence",
                       "sampler.steps=3", "wandb=off")
    evaluate(cfg)
    results = json.loads(path.read_text())
    assert "eval/nll_bound" not in results and results["eval/sampler/steps"] == 3
    assert results["eval/sampler/_target_"].endswith("LowConfidenceSampler")
    assert len((run_dir / "eval.jsonl").read_text().splitlines()) == 2


def _tiny_hf_causal_lm(folder: Path) -> Path:
    """A GPT-2 of a few thousand parameters with a character tokenizer, saved locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("0123456789+=")} | {"<unk>": 12, "<eos>": 13}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=14, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                               bos_token_id=13, eos_token_id=13)).save_pretrained(folder)
    return folder


def test_generative_perplexity_under_an_hf_causal_lm(tmp_path):
    scorer = HFScorer(str(_tiny_hf_causal_lm(tmp_path / "gpt")), batch_size=2)
    texts = ["1+2=3", "47+8=55", "", "9+9=18"]
    out = generative_perplexity(texts, scorer)
    # by hand: every character and the closing EOS, each after EOS-as-BOS
    total, count = 0.0, 0
    with torch.no_grad():
        for text in ("1+2=3", "47+8=55", "9+9=18"):
            ids = torch.tensor([[13] + scorer.tokenizer(text, add_special_tokens=False)["input_ids"] + [13]])
            logp = scorer.model(ids).logits.log_softmax(-1)
            total -= float(logp[0, :-1].gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert out["gen_ppl_tokens"] == count == (5 + 1) + (7 + 1) + (6 + 1)
    assert out["gen_nll"] == pytest.approx(total / count, rel=1e-5) and out["gen_ppl_exact"]


@pytest.mark.slow  # ~20 s: a fresh interpreter; test_evaluate_merges_into_results_json covers the same code
def test_cli_prints_the_results_path_last(run_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "-m", "dlm.evaluate", f"run={run_dir}", "num_mc=2", "max_batches=1",
         "samples.num_unconditional=2", "samples.num_prompted=0", "samples.num_infill=0", "steps=2"],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"results: {run_dir.resolve() / 'results.json'}"
    assert any(line.startswith("NLL bound:") and "K=2" in line for line in lines)
    bad = subprocess.run([sys.executable, "-m", "dlm.evaluate", f"run={run_dir.parent}"], cwd=run_dir, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr


# ---- task accuracy (dlm/reward_eval.py) -------------------------------------------------------------------------
def test_task_accuracy_scores_every_prompt_at_every_length(run_dir):
    from dlm.data.arithmetic import ArithmeticTask

    cfg = compose_eval(f"run={run_dir}", "likelihood=false", "samples.num_unconditional=0", "samples.num_prompted=0",
                       "samples.num_infill=0", "wandb=off", "prompts=arithmetic", "prompts.num_val=6",
                       "reward=arithmetic", "reward_eval.lengths=[4,8]", "reward_eval.batch_size=4",
                       "sampler=low_confidence", "reward_eval.steps_per_token=0.5")
    task = ArithmeticTask(n_digits=2, num_train=1, num_val=1)
    metrics, _ = evaluate(cfg)
    records = [json.loads(line) for line in (run_dir / "eval_rewards.jsonl").read_text().splitlines()]
    assert len(records) == 12 and {r["length"] for r in records} == {4, 8}
    for length in (4, 8):
        mine = [r for r in records if r["length"] == length]
        # every record is rescored by the task's own parser: the reported mean is these completions' accuracy
        correct = []
        for r in mine:
            parsed = task.parse(r["prompt"] + r["completion"])
            correct.append(float(parsed is not None and parsed[0] + parsed[1] == parsed[2]))
        assert [r["rewards"]["arithmetic_correct"] for r in mine] == correct
        assert metrics[f"eval/reward/arithmetic_correct@{length}"] == pytest.approx(sum(correct) / 6)
        assert all(len(r["completion"]) <= length for r in mine)  # a character tokenizer: cut at EOS, never longer
        # steps_per_token=0.5: length / 2 steps, so at most that many calls per batch (6 prompts of one length: 2)
        assert 0 < metrics[f"eval/reward/network_calls@{length}"] <= 2 * length // 2
    assert metrics["eval/reward/num_prompts"] == 6
    # the same seed: the same completions
    evaluate(cfg)
    again = [json.loads(line) for line in (run_dir / "eval_rewards.jsonl").read_text().splitlines()]
    assert again == records


def test_task_accuracy_refuses_bad_lengths_and_a_missing_reward(run_dir):
    from dlm.config import ConfigError

    with pytest.raises(ConfigError, match=r"reward_eval.lengths=.*positive integers"):
        evaluate(compose_eval(f"run={run_dir}", "reward=arithmetic", "reward_eval.lengths=[0]", "wandb=off"))
    with pytest.raises(ConfigError, match=r"task accuracy needs reward="):
        evaluate(compose_eval(f"run={run_dir}", "likelihood=false", "samples.num_unconditional=0",
                              "samples.num_prompted=0", "samples.num_infill=0", "prompts=arithmetic", "wandb=off"))
