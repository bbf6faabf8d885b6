"""One conversion to plain Python for XCom, trigger events and reports."""

from __future__ import annotations

from dayloop.jsonsafe import to_plain


def test_look_results_are_plain_python_for_the_triggerer():
    """The triggerer msgpack-encodes events and refuses numpy scalars."""
    import numpy as np

    out = to_plain({"a": np.float64(0.5), "b": [np.int64(3), {"c": np.float32(1.5)}], "d": (1, "x"),
                      "e": None, "f": float("nan")})
    assert out["a"] == 0.5 and type(out["a"]) is float and type(out["b"][0]) is int
    assert type(out["b"][1]["c"]) is float and out["d"] == [1, "x"]

    def types(v):
        if isinstance(v, dict):
            return set().union(*(types(x) for x in v.values()))
        if isinstance(v, list):
            return set().union(set(), *(types(x) for x in v))
        return {type(v).__module__}

    assert types(out) == {"builtins"}
