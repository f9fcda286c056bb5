"""What the model may do: `run(name, arguments, ctx)` and the `ToolContext` it runs in.

`run` is imported on first use (PEP 562) so that importing `tools.registry` or `tools.db`
stays cheap and free of import cycles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tools.context import ToolContext

if TYPE_CHECKING:
    from tools.runner import run

__all__ = ["ToolContext", "run"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from tools.runner import run

        return run
    raise AttributeError(f"module 'tools' has no attribute {name!r}")
