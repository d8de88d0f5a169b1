"""Optional dependencies (drgn, Volatility 3, pakunoda): imported when used, or an error that
says which extra installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from kcore.errors import KcoreError


class MissingDependencyError(KcoreError):
    """An optional tool kcore integrates with is not installed."""

    exit_code = 1


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import an optional dependency, or raise an error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the tool is there but broken: let its own error show
        raise MissingDependencyError(
            f"{module} is not installed: pip install 'kcore[{extra}]' "
            f"(or pip install {package or module})"
        ) from None
