"""Every recipe's CPU variant runs: the `cpu-variant: python -m dlm.train ...` lines of recipes/*.md, two steps each.

A recipe names its CPU-sized command(s) on lines of their own starting with `cpu-variant:`. The test runs each as
a subprocess with tiny overrides on top (2 steps, small data, few samples, no wandb); the recipe's own values of
those keys are dropped. One representative (the default run) is in the fast suite; the rest are `slow`.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
MARKER = re.compile(r"^cpu-variant:\s*(.+?)\s*$", re.MULTILINE)
FAST_RECIPE = "mdlm_embedded"
TINY = [
    "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "+trainer.enable_model_summary=false",
    "data.batch_size=8", "data.source.num_train=64", "data.source.num_val=16", "samples.num_unconditional=2",
    "samples.num_prompted=2", "samples.num_infill=2", "sampler.steps=2", "logger=none",
]


def cpu_variants() -> list[tuple[str, str]]:
    """(recipe name, command) for every cpu-variant line of recipes/*.md (README.md is the index)."""
    found = []
    for path in sorted(RECIPES.glob("*.md")):
        if path.name == "README.md":
            continue
        found += [(path.stem, cmd) for cmd in MARKER.findall(path.read_text())]
    return found


def params():
    out, counts = [], {}
    for name, cmd in cpu_variants():
        counts[name] = counts.get(name, 0) + 1
        marks = [] if name == FAST_RECIPE and counts[name] == 1 else [pytest.mark.slow]
        out.append(pytest.param(cmd, id=f"{name}-{counts[name]}", marks=marks))
    return out


def test_every_recipe_names_a_cpu_variant():
    have = {name for name, _ in cpu_variants()}
    recipes = {p.stem for p in RECIPES.glob("*.md") if p.name != "README.md"}
    assert recipes and recipes <= have, f"recipes without a `cpu-variant: python -m dlm.train ...` line: {recipes - have}"
    assert FAST_RECIPE in have
    for _, cmd in cpu_variants():
        assert cmd.startswith("python -m dlm.train"), cmd


def with_tiny_overrides(cmd: str) -> list[str]:
    """The recipe's arguments with the tiny settings on top (a key the recipe sets is replaced, not repeated)."""
    args = shlex.split(cmd)[3:]  # after `python -m dlm.train`
    ours = {o.lstrip("+").split("=", 1)[0] for o in TINY}
    kept = [a for a in args if a.lstrip("+~").split("=", 1)[0] not in ours]
    return kept + TINY


@pytest.mark.parametrize("cmd", params())
def test_cpu_variant_runs_two_steps(cmd, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "DLM_OUTPUT_ROOT": str(tmp_path / "runs"), "DLM_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "dlm.train", *with_tiny_overrides(cmd)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: "), last
    run_dir = Path(last.removeprefix("run_dir: "))
    assert (run_dir / "results.json").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()


# ---- every command a recipe shows composes ------------------------------------------------------------------------
# Indented command lines (backslash continuations joined) of `python -m dlm.train|generate|evaluate|lm_eval`; lines
# with placeholders (<run_dir>, ...) or sweeps (-m) are left out. A command naming a model config that is not in
# conf/model yet is skipped, with the name (the zoo's configs land separately).
COMMAND = re.compile(r"^ {4}(python -m dlm\.(train|generate|evaluate|lm_eval)\b[^\n]*)$", re.MULTILINE)


def recipe_commands() -> list[tuple[str, str, str]]:
    found = []
    for path in sorted(RECIPES.glob("*.md")):
        text = re.sub(r"\\\n\s*", " ", path.read_text())
        for line, cli in COMMAND.findall(text):
            line = line.split("  #", 1)[0].strip()
            if "<" in line or "..." in line or " -m " in line.split("dlm.", 1)[1]:
                continue
            found.append((path.stem, cli, line))
    return found


def _missing_model(args: list[str]) -> str | None:
    for arg in args:
        if arg.startswith("model="):
            name = arg.split("=", 1)[1]
            if not (REPO / "conf" / "model" / f"{name}.yaml").is_file():
                return name
    return None


@pytest.mark.parametrize(("cli", "cmd"), [pytest.param(cli, cmd, id=f"{name}-{i}")
                                          for i, (name, cli, cmd) in enumerate(recipe_commands())])
def test_recipe_commands_compose(cli, cmd):
    from dlm.config import preflight

    args = shlex.split(cmd)[3:]
    if cli == "lm_eval":  # compose the model_args' model, method and sampler as load_model would
        model_args = dict(a.split("=", 1) for a in args[args.index("--model_args") + 1].split(","))
        args = [f"model={model_args['model']}", f"method={model_args.get('method', 'mdlm')}"]
        args += [f"sampler={model_args['sampler']}"] if "sampler" in model_args else []
        cli = "train"
    if cli == "generate":  # as its main() does: prompt text goes through verbatim
        from dlm.generate import quote_text_overrides

        args = quote_text_overrides(args)
    missing = _missing_model(args)
    if missing:
        pytest.skip(f"conf/model/{missing}.yaml is not in this tree yet")
    assert preflight([a for a in args if "=" in a], cli) == [], cmd


def test_the_recipes_show_commands():
    names = {name for name, _, _ in recipe_commands()}
    assert {"llada", "dream", "rnd1_scp"} <= names
