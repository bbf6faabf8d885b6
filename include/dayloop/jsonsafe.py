"""One conversion to plain JSON-safe Python values, for XCom, trigger events and reports.

Airflow's triggerer msgpack-encodes events and refuses numpy scalars (the task fails with
"Trigger failure"), and ``json.dumps`` refuses numpy, dates and sets, so everything that
leaves a process as data goes through :func:`to_plain` first.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["to_plain"]


def to_plain(value: Any, *, strict_json: bool = False, stringify: bool = False) -> Any:
    """``value`` as dicts (string keys), lists and Python scalars.

    numpy scalars become Python numbers, tuples and sets become lists, dates ISO strings.
    ``strict_json``: non-finite floats become ``None`` (NaN) or ``"inf"``/``"-inf"`` strings,
    so the result is valid JSON. ``stringify``: any other object becomes ``str(obj)``
    (otherwise it is returned as it is).
    """
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, strict_json=strict_json, stringify=stringify) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v, strict_json=strict_json, stringify=stringify) for v in value]
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if type(value).__module__ == "numpy":
        if getattr(value, "ndim", 0):  # an array
            return to_plain(value.tolist(), strict_json=strict_json, stringify=stringify)
        value = value.item()
    if isinstance(value, float) and strict_json and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value) if stringify else value
