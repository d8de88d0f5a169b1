"""kcore inside other tools: drgn programs and Volatility 3 layers that read memory through kcore.

`kcore.integrations.drgn.program(root, source)` gives a drgn Program; the Volatility 3 layer
and stacker live in `kcore.integrations.volatility` (loaded by `vol -p` from the folder that
`kcore.integrations.volatility.plugin_dir()` names). Both tools are optional extras.
"""

from __future__ import annotations

from kcore.extras import MissingDependencyError, require

__all__ = ["MissingDependencyError", "require"]
