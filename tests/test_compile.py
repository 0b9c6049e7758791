"""``compile=<mode>`` (dlm/compile.py): a compiled backbone samples the same tokens with the same network calls as
the eager one, trains with the same loss and gradients, keeps its state-dict keys, runs growing-KV-cache calls
eagerly, and a bad mode names the valid ones (compiled static-cache decoding: tests/test_static_kv_cache.py). CPU inductor compiles a graph in ~10 s, so the default suite compiles two
(one sampling, one training step); the CLIs with compile=default are marked slow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch._dynamo.utils import counters

from dlm.compile import MODES, compile_backbone, is_compiled
from dlm.methods.ar import AR
from dlm.methods.mdlm import MDLM
from dlm.models import Transformer
from dlm.safe_load import load_checkpoint
from dlm.sampling import ConfidenceSampler, ThresholdSampler
from dlm.schedules import LinearSchedule

VOCAB = 12
TOKENIZER = SimpleNamespace(vocab_size=VOCAB, pad_token_id=9, eos_token_id=10, mask_token_id=11)
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def tiny_backbone() -> Transformer:
    torch.manual_seed(0)
    return Transformer(vocab_size=VOCAB, n_layers=1, d_model=32, n_heads=2, max_seq_len=32, init_std=0.3)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_bad_mode_names_the_valid_ones_and_null_stays_eager():
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="valid: null \\(eager\\), default, reduce-overhead, max-autotune"):
        compile_backbone(module, "fast")
    assert compile_backbone(module, None) is module and not is_compiled(module)
    assert "reduce-overhead" in MODES

    from dlm.generate import run_generation

    with pytest.raises(ValueError, match="compile=fastest: not a torch.compile mode"):  # before loading the run
        run_generation(OmegaConf.create({"run": "/no/such/run", "compile": "fastest"}))


def test_compiled_greedy_sampling_matches_eager_and_kv_cache_calls_stay_eager():
    model = MDLM(tiny_backbone(), TOKENIZER, LinearSchedule()).eval()
    prompt = torch.randint(0, 9, (3, 4), generator=torch.Generator().manual_seed(1))
    samplers = {
        "greedy": ConfidenceSampler(steps=12, temperature=0.0),
        "prefix cache": ThresholdSampler(threshold=0.9, temperature=0.0, block_length=4, kv_cache="prefix"),
    }
    eager = {name: model.generate(prompt, 12, sampler=s) for name, s in samplers.items()}
    ar = AR(model.backbone, TOKENIZER).eval()
    ar_eager = ar.generate(prompt, 6, sampler=None, generator=torch.Generator().manual_seed(0))

    keys = list(model.state_dict())
    compile_backbone(model.backbone, "default")
    assert list(model.state_dict()) == keys  # in place: no _orig_mod. prefix
    before = graphs()
    greedy = model.generate(prompt, 12, sampler=samplers["greedy"])
    assert graphs() > before  # the fixed-shape denoiser call was compiled
    assert torch.equal(greedy.tokens, eager["greedy"].tokens)
    assert greedy.num_network_calls == eager["greedy"].num_network_calls == 12

    # with growing KV caches (static_kv_cache=false) the cached calls (prefix cache; AR decoding) run eagerly:
    # nothing new compiled, the same tokens
    model.static_kv_cache = ar.static_kv_cache = False
    before = graphs()
    cached = model.generate(prompt, 12, sampler=samplers["prefix cache"])
    ar_compiled = ar.generate(prompt, 6, sampler=None, generator=torch.Generator().manual_seed(0))
    assert graphs() == before
    assert torch.equal(cached.tokens, eager["prefix cache"].tokens)
    assert cached.num_network_calls == eager["prefix cache"].num_network_calls
    assert torch.equal(ar_compiled.tokens, ar_eager.tokens) and ar_compiled.num_network_calls == ar_eager.num_network_calls


def test_a_compiled_training_step_matches_eager_and_checkpoints_load_uncompiled():
    def step(module, seed=0):
        g = torch.Generator().manual_seed(seed)
        batch = {"input_ids": torch.randint(0, 9, (4, 16), generator=g), "loss_mask": torch.ones(4, 16, dtype=torch.bool)}
        module.zero_grad()
        loss = module.loss(batch, generator=g)["loss"]
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}

    eager_model = MDLM(tiny_backbone(), TOKENIZER, LinearSchedule()).train()
    model = MDLM(tiny_backbone(), TOKENIZER, LinearSchedule()).train()
    compile_backbone(model.backbone, "default")
    selected = []  # the LM head runs at the masked positions only, compiled too

    @torch.compiler.disable  # a hook runs inside the compiled call: keep this probe out of the graph
    def record(module, args, kwargs):
        selected.append(int(kwargs["logits_at"].sum()))

    model.backbone.register_forward_pre_hook(record, with_kwargs=True)
    before = graphs()
    for seed in range(3):  # a different number of masked positions every step: still the one graph
        eager_loss, eager_grads = step(eager_model, seed)
        loss, grads = step(model, seed)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6)
    assert graphs() == before + 1 and len(set(selected)) > 1, selected

    state = model.state_dict()
    assert list(state) == list(eager_model.state_dict()) and not any("_orig_mod" in k for k in state)
    fresh = MDLM(tiny_backbone(), TOKENIZER, LinearSchedule())
    fresh.load_state_dict(state, strict=True)  # a compiled run's checkpoint loads into an uncompiled module


def test_the_train_config_takes_a_compile_mode():
    from conftest import compose

    assert compose([]).compile is None
    assert compose(["compile=reduce-overhead"]).compile == "reduce-overhead"


# ---- the CLIs (slow: each compiles its graphs in a fresh process) -----------------------------------------
def train_cli(out: Path, *args: str) -> subprocess.CompletedProcess:
    fast = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "data.batch_size=8",
            "data.source.num_train=256", "data.source.num_val=32", "samples.num_unconditional=0",
            "samples.num_prompted=0", "samples.num_infill=0", "logger=none", "name=compiled"]
    env = {**ENV, "DLM_OUTPUT_ROOT": str(out / "runs"), "DLM_CACHE_DIR": str(out / "cache")}
    return subprocess.run([sys.executable, "-m", "dlm.train", *fast, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def run_dir_of(proc) -> Path:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1].split("run_dir: ", 1)[1])


@pytest.mark.slow  # ~1-2 min on 2 CPU cores: a compiled training run, then generation with compile=default
def test_compiled_training_run_resumes_and_loads_uncompiled_and_generate_takes_compile(tmp_path):
    from dlm.run import load_run

    run_dir = run_dir_of(train_cli(tmp_path, "compile=default"))
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert not any("_orig_mod" in k for k in state)
    loaded = load_run(run_dir)  # an uncompiled module, strict key match
    assert not is_compiled(loaded.module.backbone)

    resumed = run_dir_of(train_cli(tmp_path, "trainer.max_steps=6", "ckpt_path=last"))  # resumed without compile
    assert resumed == run_dir
    assert '"global_step": 6' in (run_dir / "results.json").read_text()

    args = [f"run={run_dir}", "prompt=((", "length=8", "num_samples=2", "sampler=margin", "steps=8"]
    runs = {mode: subprocess.run([sys.executable, "-m", "dlm.generate", *args, f"compile={mode}"], cwd=ROOT, env=ENV,
                                 capture_output=True, text=True, timeout=600) for mode in ("null", "default")}
    for proc in runs.values():
        assert proc.returncode == 0, proc.stderr[-3000:]
    eager, compiled = ([ln for ln in p.stdout.splitlines() if not ln.startswith("[")] for p in runs.values())
    assert compiled[:2] == eager[:2]  # the same texts
    assert "network calls: 8 |" in eager[2] and "network calls: 8 |" in compiled[2]
    assert "compile: default (untimed warm-up run:" in compiled[2] and "compile:" not in eager[2]


@pytest.mark.slow  # ~1 min on 2 CPU cores: trains a tiny model, times every sampler eager and compiled
def test_the_sampler_benchmark_adds_compiled_rows_with_the_same_calls_and_accuracy():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "samplers.py"), "--quick", "--compile", "default"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    heads = [i for i, ln in enumerate(lines) if ln.startswith("sampler")]
    assert len(heads) == 2 and lines[heads[1]].endswith("vs eager")
    eager, compiled = lines[heads[0] + 2 : heads[1] - 1], lines[heads[1] + 2 :]
    assert "compile mode=default" in lines[heads[1] - 1] and len(eager) == len(compiled) == 18
    for e, c in zip(eager, compiled):
        # greedy samplers: the same calls per token and accuracy (columns calls/tok .. acc - naive)
        assert e.split()[-4:] == c.split()[-5:-1], (e, c)
