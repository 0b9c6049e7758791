"""The lm-evaluation-harness adapter (model type `dlm`): local tasks only, no download."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from test_analysis import make_tiny_sweep  # noqa: E402

from dlm.data.tokenizers import CharTokenizer  # noqa: E402
from dlm.lm_eval_model import DLMHarnessModel, mc_continuation_nll  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = [
    {"question": "12+7=", "choices": ["19", "20", "91"], "label": 0, "answer": "19"},
    {"question": "3+4=", "choices": ["8", "7", "34"], "label": 1, "answer": "7"},
    {"question": "25+25=", "choices": ["55", "45", "50"], "label": 2, "answer": "50"},
    {"question": "9+9=", "choices": ["18", "99", "81"], "label": 0, "answer": "18"},
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_sweep(tmp_path_factory.getbasetemp()) / "0"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Three tasks over one local jsonl: multiple choice, generation (stop at "="), rolling likelihood."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = textwrap.dedent(f"""\
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        metadata:
          version: 1.0
    """)
    (folder / "mc.yaml").write_text(common + textwrap.dedent("""\
        task: dlm_tiny_mc
        output_type: multiple_choice
        doc_to_text: "{{question}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: label
        target_delimiter: ""
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
    """))
    (folder / "gen.yaml").write_text(common + textwrap.dedent("""\
        task: dlm_tiny_gen
        output_type: generate_until
        doc_to_text: "{{question}}"
        doc_to_target: "{{answer}}"
        target_delimiter: ""
        generation_kwargs:
          until: ["="]
          max_gen_toks: 6
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
    """))
    (folder / "roll.yaml").write_text(common + textwrap.dedent("""\
        task: dlm_tiny_rolling
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{question}}{{answer}}"
        metric_list:
          - metric: bits_per_byte
    """))
    return folder


def requests(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_simple_evaluate_on_local_tasks(run_dir, task_dir):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="dlm", model_args=f"run={run_dir},mc_num=4,sampler_steps=4", batch_size=16, device="cpu",
        tasks=["dlm_tiny_mc", "dlm_tiny_gen", "dlm_tiny_rolling"],
        task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
    )
    res = out["results"]
    assert 0.0 <= res["dlm_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= res["dlm_tiny_gen"]["exact_match,none"] <= 1.0
    assert math.isfinite(res["dlm_tiny_rolling"]["bits_per_byte,none"]) and res["dlm_tiny_rolling"]["bits_per_byte,none"] > 0
    for sample in out["samples"]["dlm_tiny_mc"]:
        assert all(math.isfinite(ll) and ll <= 0 for ll, _ in sample["filtered_resps"])
    for sample in out["samples"]["dlm_tiny_gen"]:
        text = sample["filtered_resps"][0]
        assert "=" not in text and len(text) <= 6 and set(text) <= set("0123456789+")


def test_one_token_continuation_is_exact_and_reproducible(run_dir):
    model = DLMHarnessModel(run=str(run_dir), mc_num=5, batch_size=2)
    module, tok = model.module, model.tok
    ctx, cont = "12+7=1", "9"
    x = torch.tensor([tok.encode(ctx) + [module.mask_id]])
    logp = module.denoise(x)[0, -1]
    expected = float(logp[tok.encode(cont)[0]])
    (ll, greedy), (ll2, _) = model.loglikelihood(requests("loglikelihood", [(ctx, cont), (ctx, cont)]))
    assert ll == pytest.approx(expected, abs=1e-5) and ll2 == ll
    assert greedy == bool(logp.argmax() == tok.encode(cont)[0])
    # Longer continuations: an estimate, finite, the same for the same seed, different for another seed.
    reqs = requests("loglikelihood", [("3+4=", "17"), ("25+", "25=50")])
    a = model.loglikelihood(reqs)
    assert a == model.loglikelihood(reqs)
    assert all(math.isfinite(v) and v < 0 and g is False for v, g in a)
    other = DLMHarnessModel(run=str(run_dir), mc_num=5, batch_size=2, seed=1)
    assert other.loglikelihood(reqs)[1][0] != a[1][0]


def test_mc_estimator_averages_the_closed_form_terms(run_dir):
    """|cont| = 2, mc_num = 2: one draw masks both tokens (l = 2), the other one token (l = 1, weight 2)."""
    model = DLMHarnessModel(run=str(run_dir))
    module, tok = model.module, model.tok
    ctx, cont = tok.encode("47+8="), tok.encode("55")
    M = module.mask_id

    def nll(row, pos):
        logp = module.denoise(torch.tensor([row]))[0]
        return -sum(float(logp[p, row_true]) for p, row_true in pos)

    both = nll(ctx + [M, M], [(5, cont[0]), (6, cont[1])])
    first = 2 * nll(ctx + [M, cont[1]], [(5, cont[0])])
    second = 2 * nll(ctx + [cont[0], M], [(6, cont[1])])
    est, _ = mc_continuation_nll(module, ctx, cont, 2, torch.Generator().manual_seed(0))
    assert min(abs(est - (both + first) / 2), abs(est - (both + second) / 2)) < 1e-4


@torch.no_grad()
def test_exact_family_scores_the_continuation_by_the_chain_rule():
    from dlm.methods.ar import AR
    from dlm.models.transformer import Transformer

    tok = CharTokenizer("0123456789+=")
    torch.manual_seed(0)
    backbone = Transformer(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=4, max_seq_len=32)
    module = AR(backbone, tok).eval()
    model = DLMHarnessModel(module=module, device="cpu")
    assert model.estimator == "exact"
    pairs = [("12+7=", "19"), ("3+", "4=7"), ("", "5")]
    out = model.loglikelihood(requests("loglikelihood", pairs))
    for (ctx, cont), (ll, greedy) in zip(pairs, out):
        ids = torch.tensor([tok.encode(ctx + cont)])
        counted = torch.zeros_like(ids, dtype=torch.bool)
        counted[:, len(ctx):] = True
        nll = module.nll_bound({"input_ids": ids, "loss_mask": counted})
        assert ll == pytest.approx(-float(nll.sum()), abs=1e-4)
        logits = module.next_token_logits(ids)[0, len(ctx):]
        assert greedy == bool((logits.argmax(-1) == ids[0, len(ctx):]).all())
    # Rolling: the whole text from the start token, exactly the family's NLL.
    (roll,) = model.loglikelihood_rolling(requests("loglikelihood_rolling", [("12+7=19",)]))
    ids = torch.tensor([tok.encode("12+7=19")])
    assert roll == pytest.approx(-float(module.nll_bound({"input_ids": ids, "loss_mask": torch.ones_like(ids).bool()}).sum()),
                                 abs=1e-4)
    texts = model.generate_until(requests("generate_until", [("1+1=", {"until": ["+"], "max_gen_toks": 5})]))
    assert len(texts) == 1 and "+" not in texts[0] and len(texts[0]) <= 5


@torch.no_grad()
def test_rolling_likelihood_of_a_long_text_sums_its_windows():
    from dlm.methods.ar import AR
    from dlm.models.transformer import Transformer

    tok = CharTokenizer("0123456789+=")
    torch.manual_seed(0)
    backbone = Transformer(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=4, max_seq_len=9)
    module = AR(backbone, tok).eval()
    model = DLMHarnessModel(module=module, device="cpu")
    text = "12+7=19+3=22+1=23"  # 17 tokens; windows of max_seq_len - 1 = 8 (AR scores after a start token)

    def nll(piece: str) -> float:
        ids = torch.tensor([tok.encode(piece)])
        return float(module.nll_bound({"input_ids": ids, "loss_mask": torch.ones_like(ids).bool()}).sum())

    (roll,) = model.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert roll == pytest.approx(-(nll(text[:8]) + nll(text[8:16]) + nll(text[16:])), abs=1e-4)


def test_bad_model_args_are_named(run_dir):
    with pytest.raises(ValueError, match="run="):
        DLMHarnessModel()
    with pytest.raises(ValueError, match="unknown model_args"):
        DLMHarnessModel(run=str(run_dir), mcnum=3)
    with pytest.raises(ValueError, match="estimator=exact"):
        DLMHarnessModel(run=str(run_dir), estimator="exact")
    with pytest.raises(ValueError, match="low_confidence"):
        DLMHarnessModel(run=str(run_dir), sampler="nosuch")


@pytest.mark.slow
def test_cli_wrapper_registers_the_model(run_dir, task_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dlm.lm_eval", "--model", "dlm", "--model_args", f"run={run_dir},mc_num=2",
         "--tasks", "dlm_tiny_mc", "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "8",
         "--output_path", str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dlm_tiny_mc" in proc.stdout and "acc" in proc.stdout
    results = list((tmp_path / "out").rglob("results*.json"))
    assert results and "acc,none" in json.loads(results[0].read_text())["results"]["dlm_tiny_mc"]
