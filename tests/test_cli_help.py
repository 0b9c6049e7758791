"""`python -m dlm.train --help` (dlm/cli_help.py) prints exactly Hydra's help text, without Hydra's group listing
(a deep copy of its config store per group: 2.5x `--cfg job`)."""

from __future__ import annotations

import contextlib
import io

import pytest
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path, get_args_parser
from hydra.core.global_hydra import GlobalHydra

from dlm.cli_help import app_groups, help_text, wants_help
from dlm.config import CONF_DIR, GROUPS, register_resolvers


def hydras_help(argv: list[str]) -> str:
    """What Hydra's own --help prints (hydra._internal.utils._run_hydra's path)."""
    register_resolvers()
    GlobalHydra.instance().clear()
    parser = get_args_parser()
    hydra = Hydra.create_main_hydra2(task_name="train", config_search_path=create_config_search_path(str(CONF_DIR)))
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            hydra.app_help(config_name="train", args_parser=parser, args=parser.parse_args(argv))
    finally:
        GlobalHydra.instance().clear()
    return out.getvalue()


@pytest.mark.parametrize("argv", [["--help"], ["model=moe30b", "method=bd3lm", "-h"],
                                  ["--help", "--resolve", "model=tiny", "paths.run_dir=/tmp/x"]])
def test_the_help_is_hydras(argv):
    assert wants_help(argv)
    assert help_text(argv) + "\n" == hydras_help(argv)


def test_what_only_hydra_lists_goes_to_hydra():
    assert not wants_help(["--hydra-help"]) and not wants_help(["--help", "hydra.searchpath=[file:///x]"])
    assert not wants_help(["model=tiny"]) and not wants_help(["-m", "--help", "method=mdlm,ar"])
    assert set(GROUPS) <= set(app_groups())
