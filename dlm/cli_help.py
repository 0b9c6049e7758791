"""``--help`` of the training CLI: Hydra's own text, without Hydra's group listing (issue #17).

Hydra's ``--help`` lists the config groups by building a config repository per group and option kind (a deep copy
of its config store each time: 136 of them for dlm's conf/), and lists Hydra's own groups too, which its default
help template does not show. That made ``--help`` 2.5x ``--cfg job``. Here the groups are read from conf/ (what
Hydra finds there: a folder holding .yaml files is a group, its files the options), the config is composed once,
and Hydra's template (``hydra.help``) is filled in as Hydra fills it. What only Hydra can list goes to Hydra's own
help: a config search path of the user's (``hydra.searchpath``), a template that shows ``$HYDRA_CONFIG_GROUPS``, a
multirun command line.
tests/test_cli_help.py checks the text equals Hydra's.
"""

from __future__ import annotations

import string
from pathlib import Path

from dlm.config import CONF_DIR


def wants_help(argv: list[str]) -> bool:
    """Whether this command line asks for the application's help that :func:`help_text` can print."""
    return bool({"--help", "-h"} & set(argv)) and not {"--hydra-help", "-m", "--multirun"} & set(argv) and not any(
        a.lstrip("+~").startswith(("hydra.searchpath", "hydra/")) for a in argv)


def app_groups(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """{group: sorted options} of the config folder, Hydra's own groups (hydra/...) left out."""
    groups = {}
    for folder in (p for p in conf_dir.rglob("*") if p.is_dir()):
        group = folder.relative_to(conf_dir).as_posix()
        options = sorted(p.stem for p in folder.glob("*.yaml") if p.is_file())
        if options and group != "hydra" and not group.startswith("hydra/"):
            groups[group] = options
    return dict(sorted(groups.items()))


def help_text(argv: list[str], config_name: str = "train") -> str | None:
    """The text Hydra's ``--help`` prints for this command line, or None where only Hydra can tell."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, flag_override

    from dlm.config import register_resolvers

    parser = get_args_parser()
    args = parser.parse_args(argv)
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=config_name):
            cfg = compose(config_name, overrides=args.overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            template = cfg.hydra.help.template
            if "HYDRA_CONFIG_GROUPS" in template:
                return None
            with flag_override(cfg, ["struct", "readonly"], [False, False]):
                del cfg["hydra"]
            groups = "".join(f"{group}: {', '.join(options)}\n" for group, options in app_groups().items())
            return string.Template(template).substitute(
                FLAGS_HELP=Hydra.format_args_help(parser), APP_CONFIG_GROUPS=groups,
                CONFIG=OmegaConf.to_yaml(cfg, resolve=args.resolve))
    finally:
        GlobalHydra.instance().clear()
