"""Package attributes that import their module on first use (PEP 562), so that importing a light submodule of a
package (a tokenizer, a model's declarations: what a plan and the CLIs' start-up read) pays for no torch,
transformers or Lightning (issue #17)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module


def lazy_attributes(package: str, where: dict[str, str]) -> tuple[Callable, Callable]:
    """A package's ``__getattr__`` and ``__dir__`` for ``where`` (name -> the module that defines it): the name is
    imported when first read, then kept in the package's globals."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(where[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
