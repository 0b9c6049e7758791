"""Quiet, honest console output: each Lightning line once, no Lightning advertisement, no `Total FLOPs: 0`, and
progress bars (dlm.progress) that count the work of end-of-fit sampling, dlm.evaluate and lm-eval scoring,
shown on a terminal only."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlm import progress as progress_module
from dlm.progress import Bar

# Lightning's INFO lines of a CPU run (each must appear, and once).
LIGHTNING_LINES = ("Seed set to 0", "GPU available:", "TPU available:", "`Trainer.fit` stopped: `max_steps=3` reached")


def test_tiny_training_prints_each_line_once_and_nothing_dishonest(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "DLM_OUTPUT_ROOT": str(tmp_path / "runs"),
           "DLM_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "dlm.train", "trainer.max_steps=3", "logger=none", "trainer.val_check_interval=3",
         "trainer.limit_val_batches=1", "data.source.num_train=256", "data.batch_size=8", "samples.num_prompted=2",
         "samples.num_infill=2", "samples.num_unconditional=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for text in LIGHTNING_LINES:
        assert sum(text in line for line in lines) == 1, (text, output)
    logged = [line for line in lines if line.startswith("INFO:") or "[INFO]" in line]
    assert logged and not [line for line, n in collections.Counter(logged).items() if n > 1], output
    assert "litlogger" not in output and "Trainer already configured" not in output
    assert "Total params" in output and "FLOPs" not in output  # the summary, without Lightning's FLOPs count (0)
    assert "sampling" not in output  # not a terminal: no progress bar lines in the log
    run_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("run_dir: "))
    run_dir = run_dir if run_dir.is_absolute() else tmp_path / run_dir
    log = (run_dir / "train.log").read_text()  # the run's own record, each line once too
    assert log.count("GPU available:") == 1


class RecordingBar(Bar):
    made: list[RecordingBar] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingBar.made.append(self)


@pytest.fixture
def bars(monkeypatch):
    import dlm.callbacks.samples
    import dlm.evaluate
    import dlm.likelihood

    RecordingBar.made = []
    for module in (dlm.callbacks.samples, dlm.evaluate, dlm.likelihood):
        monkeypatch.setattr(module, "Bar", RecordingBar)
    return RecordingBar.made


def test_bar_counts_its_work_and_draws_nothing_off_a_terminal(capsys):
    with Bar(5, "work") as bar:
        for _ in range(3):
            bar.advance()
        bar.advance(2)
    assert (bar.total, bar.completed) == (5, 5)
    assert not bar.shown  # pytest's captured output is not a terminal
    assert capsys.readouterr() == ("", "")
    assert not Bar(5, "off", enabled=False).shown


def test_bar_is_shown_on_a_terminal_unless_disabled(monkeypatch):
    import rich

    console = rich.get_console()
    monkeypatch.setattr(type(console), "is_terminal", property(lambda self: True))
    assert Bar(3, "on").shown
    assert not Bar(3, "off", enabled=False).shown
    assert not Bar(0, "nothing to do").shown
    assert progress_module.REFRESH_S > 0


@pytest.fixture
def tiny(run_cfg):
    """A tiny untrained MDLM on the brackets data (a task: prompted and infill samples are scored)."""
    from dlm.build import build_datamodule, build_module

    cfg = run_cfg()
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    return build_module(cfg, datamodule).eval(), datamodule


def test_sampling_bar_counts_every_sample(tiny, bars):
    from dlm.callbacks.samples import write_samples

    module, dm = tiny
    rows, _ = write_samples(module, dm.tokenizer, dm.task, length=dm.seq_len, num_unconditional=3, num_prompted=4,
                            num_infill=5)
    (bar,) = bars
    assert bar.total == bar.completed == len(rows) > 7


def test_likelihood_bar_counts_every_batch_of_every_draw(tiny, bars):
    from dlm.likelihood import likelihood

    module, dm = tiny
    likelihood(module, dm.val_dataloader(), num_mc=3, max_batches=2)
    (bar,) = bars
    assert bar.total == bar.completed == 3 * 2


@torch.no_grad()
def test_lm_eval_bars_count_every_request(monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    import dlm.lm_eval_model as adapter
    from dlm.data.tokenizers import CharTokenizer
    from dlm.methods.ar import AR
    from dlm.models.transformer import Transformer

    RecordingBar.made = []
    monkeypatch.setattr(adapter, "Bar", RecordingBar)
    tok = CharTokenizer("0123456789+=")
    backbone = Transformer(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=4, max_seq_len=32)
    model = adapter.DLMHarnessModel(module=AR(backbone, tok).eval(), device="cpu", batch_size=2)

    def requests(kind, args):
        return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]

    model.loglikelihood(requests("loglikelihood", [("1+1=", "2"), ("2+", "3=5"), ("", "7")]))
    model.loglikelihood_rolling(requests("loglikelihood_rolling", [("12+7=19",), ("3+4=7",)]), disable_tqdm=True)
    model.generate_until(requests("generate_until", [("1+1=", {"max_gen_toks": 3})] * 3))
    assert [(b.description, b.total, b.completed) for b in RecordingBar.made] == [
        ("lm-eval loglikelihood", 3, 3), ("lm-eval loglikelihood_rolling", 2, 2), ("lm-eval generate_until", 3, 3)]
    assert not RecordingBar.made[1].shown  # lm_eval's disable_tqdm


def test_text_summary_has_no_flops(tiny, caplog):
    import lightning as L

    from dlm.callbacks.summary import ModelSummary

    module, _ = tiny
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    with caplog.at_level("INFO"):
        ModelSummary().on_fit_start(trainer, module)
        ModelSummary(enabled=False).on_fit_start(trainer, module)  # trainer.enable_model_summary=false
    (record,) = [r for r in caplog.records if "Total params" in r.getMessage()]
    assert "backbone" in record.getMessage() and "FLOPs" not in record.getMessage()
