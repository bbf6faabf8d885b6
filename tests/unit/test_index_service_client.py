"""The index service clients' pure helpers: query rows, search bodies, errors, light imports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serving.index_service import client as cl

# --------------------------------------------------------------------- client


def test_client_rows_and_body() -> None:
    assert cl._as_rows(np.array([1, 2], dtype=np.float64)) == [[1.0, 2.0]]
    assert cl._as_rows([[1, 2], [3, 4]]) == [[1.0, 2.0], [3.0, 4.0]]
    for bad in ([], [[]], [[[1.0]]], [1.0, float("nan")], [[float("inf")]]):
        with pytest.raises(ValueError):
            cl._as_rows(bad)
    body = json.loads(cl._search_body(3, [[0.5]], np.int64(7)))
    assert body == {"version": 3, "vectors": [[0.5]], "k": 7}
    for k in (0, True, 2.5):
        with pytest.raises(ValueError):
            cl._search_body(3, [[0.5]], k)
    for version in (0, -1, True, "3", 1.0):
        with pytest.raises(ValueError):
            cl._version(version)


def test_client_error_text() -> None:
    err = cl.IndexServiceError(404, "index version 3 is not loaded")
    assert err.status == 404 and str(err) == "index service HTTP 404: index version 3 is not loaded"
    down = cl.IndexServiceError(None, "cannot reach http://x")
    assert down.status is None and "unreachable" in str(down)


def test_client_module_stays_light() -> None:
    src = Path(cl.__file__).read_text()
    imports = {line.split()[1].split(".")[0] for line in src.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "json", "collections", "dataclasses", "typing", "httpx", "numpy"}, imports
