"""Inputs for the user simulator: the panel of users and the items truly relevant to each.

The simulator itself lives in the data plane (``serving.simulator``) and reads the panel
file with numpy alone; this package only decides who the users are and what they like.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = ("Panel", "make_panel", "panel_from_replay", "panel_from_synthetic", "read_panel",
            "write_panel")
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy, so `python -m dayloop.simulation.panel` does not import the module twice.
    if name in _EXPORTS:
        from dayloop.simulation import panel

        return getattr(panel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
