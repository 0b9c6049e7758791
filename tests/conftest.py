"""Shared test fixtures: compose the real Hydra config in-process, offline, into temporary folders."""

from __future__ import annotations

import os

import pytest

# No test may reach the network: model and dataset hubs are offline, wandb stays local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Small, fast settings for runs in tests (the embedded arithmetic data, the tiny model).
FAST = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_model_summary=false",
    "data.batch_size=16",
    "data.source.num_train=512",
    "data.source.num_val=64",
    "samples.num_unconditional=4",
    "samples.num_prompted=4",
    "samples.num_infill=4",
    "sampler.steps=4",
    "logger=none",
]


def train_recorded(cfg):
    """train(cfg) with the run's .hydra/config.yaml written first, as the CLI does (load_run, a resume and the
    end-of-run export rebuild the model from it); returns the run folder."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from dlm.train import train

    run = Path(cfg.paths.run_dir)
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return train(cfg)


def write_tiny_qwen3(folder):
    """A tiny pretrained Qwen3 (conf/model/qwen3_tiny.yaml's geometry, random weights, seed 0) saved as an HF folder:
    the base a LoRA run adapts. Returns the folder."""
    from pathlib import Path

    import torch
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM

    geometry = OmegaConf.to_container(
        OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / "qwen3_tiny.yaml").config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(geometry.pop("model_type"), **geometry))
    model.save_pretrained(folder)
    return folder


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dlm.config import CONF_DIR, register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


@pytest.fixture
def run_cfg(tmp_path):
    """compose(overrides) for a run writing into tmp_path (run folder, data cache)."""

    def make(*overrides: str, run_dir=None):
        run_dir = run_dir or tmp_path / "run"
        other_data = any(o.startswith("data=") for o in overrides)
        fast = [o for o in FAST if not (other_data and o.startswith("data.source."))]
        return compose(
            fast
            + [f"paths.run_dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}", "name=test"]
            + list(overrides)
        )

    return make


# A tiny run through the training CLI (dlm.train.main, in-process).
TINY_CLI = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
            "data.batch_size=8", "samples.num_unconditional=1", "samples.num_prompted=1", "samples.num_infill=1",
            "sampler.steps=2", "logger=none", "name=resume"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with the output and cache roots inside it (DLM_OUTPUT_ROOT, DLM_CACHE_DIR)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DLM_OUTPUT_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("DLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """``run_cli(main, *args) -> (exit code, stdout, stderr)``: a CLI's ``main`` (dlm.train.main, dlm.generate.main
    ...) with ``args`` as its command line, run in this process."""
    import sys

    def run(main, *args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["dlm", *args])
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def train_cli(run_cli):
    """``train_cli(*args) -> (exit code, stdout, stderr)``: python -m dlm.train <args>, run in this process."""
    from dlm.train import main

    return lambda *args: run_cli(main, *args)


def run_dir_of(stdout: str):
    """The run folder a training CLI printed on its last line."""
    from pathlib import Path

    return Path(stdout.strip().splitlines()[-1].removeprefix("run_dir: "))


def write_mc_task(folder, name: str, doc: dict, target_delimiter: str | None = None):
    """One local lm-eval multiple-choice task ``name`` in ``folder`` (no download): ``doc`` holds "question",
    "choices" and "label"; returns the folder (lm_eval's --include_path)."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.jsonl").write_text(json.dumps(doc) + "\n")
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {folder / 'data.jsonl'}", "test_split: test", "output_type: multiple_choice",
             'doc_to_text: "{{question}}"', 'doc_to_choice: "{{choices}}"', "doc_to_target: label"]
    if target_delimiter is not None:
        lines.append(f'target_delimiter: "{target_delimiter}"')
    lines += ["metric_list:", "  - metric: acc", "metadata:", "  version: 1.0"]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return folder
