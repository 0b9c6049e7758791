"""Type and range checks of single config values, shared by the CLIs' config checks (dlm.config.check_config and
the request checks of dlm.generate / dlm.evaluate). Each returns a problem line naming the key, the value given
and the valid form, or None; callers collect the lines and raise one ConfigError listing them all.

Why here and not in Hydra's schema: the groups (optimizer, trainer, data ...) are ``Any`` in the schema so that
every option can bring its own keys; their values are checked after composition, before anything is built."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

_MISSING = object()


def _value(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(cfg: DictConfig, key: str, minimum: int | None = None, maximum: int | None = None,
            nullable: bool = False, null_means: str = "") -> str | None:
    """``key`` is an integer in [minimum, maximum] (or null when ``nullable``); absent keys are not checked."""
    v = _value(cfg, key)
    if v is _MISSING or (v is None and nullable):
        return None
    if _is_int(v) and (minimum is None or v >= minimum) and (maximum is None or v <= maximum):
        return None
    if minimum is not None and maximum is not None:
        form = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        form = {0: "an integer >= 0", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    else:
        form = "an integer"
    return f"{key}={v!r} must be {form}" + (f" (or null{null_means})" if nullable else "")


def number(cfg: DictConfig, key: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, nullable: bool = False) -> str | None:
    """``key`` is a finite number in the interval (``*_open``: that end excluded), or null when ``nullable``."""
    v = _value(cfg, key)
    if v is _MISSING or (v is None and nullable):
        return None
    ok = _is_number(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if ok:
        return None
    if low is not None and high is not None:
        form = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        form = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        form = "a number"
    return f"{key}={v!r} must be {form}" + (" (or null)" if nullable else "")


def boolean(cfg: DictConfig, key: str, nullable: bool = False) -> str | None:
    v = _value(cfg, key)
    if v is _MISSING or isinstance(v, bool) or (v is None and nullable):
        return None
    return f"{key}={v!r} must be true or false" + (" (or null)" if nullable else "")


def choice(cfg: DictConfig, key: str, options: tuple) -> str | None:
    v = _value(cfg, key)
    if v is _MISSING or v in options:
        return None
    return f"{key}={v!r} must be one of {', '.join('null' if o is None else str(o) for o in options)}"


def collect(*problems: str | None) -> list[str]:
    return [p for p in problems if p]


def run_given(cfg: DictConfig, forms: str) -> str | None:
    """A CLI request's ``run=`` or ``model=`` (a checkpoint from its model config, dlm.run.load_model): exactly one;
    ``forms`` says what run= may be."""
    run = None if OmegaConf.is_missing(cfg, "run") else cfg.get("run")
    if run and cfg.get("model") is not None:
        return (f"run={run} and model= are both given: run= loads a trained run folder, model=<conf/model option> a "
                f"checkpoint without one; give one of them")
    if not run and cfg.get("model") is None:
        return f"run= is required: {forms}; or model=<conf/model option> for a checkpoint without a run folder"
    return None


def torch_device(cfg: DictConfig, key: str = "device") -> str | None:
    """``key`` names a torch device."""
    import torch  # lazily: the config checks run before torch is needed

    try:
        torch.device(str(cfg.get(key, "cpu")))
    except RuntimeError:
        return f"{key}={cfg.get(key)!r} is not a torch device; use cpu, cuda or cuda:<index>"
    return None
