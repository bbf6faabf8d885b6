"""Pure parts of the control plane's serving calls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dayloop.errors import DayloopError
from dayloop.rollout.pairs import index_source
from dayloop.training.train import serving_histories


def test_mlflow_artifact_uris_become_the_servers_artifact_url():
    uri = "mlflow-artifacts:/1/abc123/artifacts/index"
    assert index_source(uri, "http://127.0.0.1:5000/") == (
        "http://127.0.0.1:5000/api/2.0/mlflow-artifacts/artifacts/1/abc123/artifacts/index")
    assert index_source("/srv/models/v3/index", "sqlite:///x.db") == "/srv/models/v3/index"
    assert index_source("file:///srv/i", "http://h") == "file:///srv/i"


@pytest.mark.parametrize("uri, tracking", [
    ("mlflow-artifacts:/1/a/artifacts/index", "sqlite:///x.db"),
    ("s3://bucket/index", "http://h"),
    ("relative/path", "http://h"),
])
def test_unreadable_index_uris_are_refused(uri, tracking):
    with pytest.raises(DayloopError):
        index_source(uri, tracking)


def test_serving_histories_are_the_last_events_as_model_indices():
    train = pd.DataFrame({
        "user_id": [10, 10, 20, 30],
        "item_id": [101, 102, 103, 999],       # 999 is outside the vocabulary
        "ts": pd.to_datetime([1, 2, 1, 1], unit="s"),
        "hist": [[], [101], [], [101, 103]],
    })
    user_vocab = np.array([10, 20, 30, 40], dtype=np.int64)
    item_vocab = np.array([101, 102, 103], dtype=np.int64)
    h = serving_histories(train, user_vocab, item_vocab, history_length=3)
    assert h.shape == (4, 3)
    np.testing.assert_array_equal(h[0], [2, 1, 0])   # 102 then 101, most recent first
    np.testing.assert_array_equal(h[1], [3, 0, 0])
    np.testing.assert_array_equal(h[2], [0, 1, 3])   # unknown item -> 0 in place
    np.testing.assert_array_equal(h[3], [0, 0, 0])   # no events
