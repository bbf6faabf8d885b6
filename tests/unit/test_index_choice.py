"""choose_index_spec / IndexSpec: pure rules, no FAISS needed."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest

from dayloop.index.faiss_index import IndexSpec, choose_index_spec


def test_below_threshold_is_exact() -> None:
    for n in (1, 10, 49_999):
        assert choose_index_spec(n, 64).kind == "flat"


def test_threshold_boundary_switches_to_ivf() -> None:
    assert choose_index_spec(49_999, 64, exact_threshold=50_000).kind == "flat"
    assert choose_index_spec(50_000, 64, exact_threshold=50_000).kind == "ivf"


def test_custom_threshold_is_honoured() -> None:
    assert choose_index_spec(10_000, 32, exact_threshold=5_000).kind == "ivf"
    assert choose_index_spec(10_000, 32, exact_threshold=20_000).kind == "flat"


@pytest.mark.parametrize("n", [100_000, 1_000_000, 10_000_000])
def test_ivf_nlist_follows_four_sqrt_n(n: int) -> None:
    spec = choose_index_spec(n, 64)
    assert spec.kind == "ivf"
    assert 3.9 * math.sqrt(n) <= spec.nlist <= 4.1 * math.sqrt(n)
    assert 1 <= spec.nprobe <= spec.nlist


def test_nlist_grows_with_catalogue() -> None:
    sizes = [60_000, 250_000, 1_000_000, 4_000_000]
    nlists = [choose_index_spec(n, 64).nlist for n in sizes]
    assert nlists == sorted(nlists) and len(set(nlists)) == len(nlists)


def test_nlist_leaves_enough_training_points_per_list() -> None:
    # Forced approximate on a small catalogue: every list must still get >= 39 points.
    for n in (1, 38, 100, 500, 1_000, 2_000, 5_000, 20_000):
        spec = choose_index_spec(n, 16, exact_threshold=0)
        assert spec.kind == "ivf"
        assert spec.nlist == 1 or n / spec.nlist >= 39
        assert 1 <= spec.nprobe <= spec.nlist


def test_nlist_upper_clamp() -> None:
    spec = choose_index_spec(10**12, 64)
    assert spec.nlist == 65_536
    assert spec.nprobe <= spec.nlist


def test_nprobe_does_not_shrink_with_k() -> None:
    small = choose_index_spec(1_000_000, 64, k=10)
    large = choose_index_spec(1_000_000, 64, k=1_000)
    assert large.nprobe >= small.nprobe
    assert large.nprobe > small.nprobe  # k=1000 must ask for more lists than k=10


def test_hnsw_when_asked() -> None:
    spec = choose_index_spec(2_000_000, 64, k=300, approximate="hnsw")
    assert spec.kind == "hnsw"
    assert spec.hnsw_m >= 2
    assert spec.ef_search >= 300  # efSearch below k cannot return k results well
    assert spec.ef_construction >= spec.hnsw_m
    # HNSW is only chosen above the threshold too.
    assert choose_index_spec(10, 64, approximate="hnsw").kind == "flat"


def test_metric_is_inner_product_everywhere() -> None:
    for n in (10, 100_000):
        for approx in ("ivf", "hnsw"):
            assert choose_index_spec(n, 8, approximate=approx).metric == "inner_product"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_items": 0, "dim": 8},
        {"n_items": 10, "dim": 0},
        {"n_items": 10, "dim": 8, "exact_threshold": -1},
        {"n_items": 10, "dim": 8, "k": 0},
        {"n_items": 10, "dim": 8, "approximate": "lsh"},
    ],
)
def test_choose_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        choose_index_spec(**kwargs)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"kind": "pq"}, "kind"),
        ({"kind": "flat", "metric": "l2"}, "metric"),
        ({"kind": "ivf", "nlist": 0, "nprobe": 1}, "nlist"),
        ({"kind": "ivf", "nlist": 10, "nprobe": 11}, "nprobe"),
        ({"kind": "ivf", "nlist": 10, "nprobe": 0}, "nprobe"),
        ({"kind": "hnsw", "hnsw_m": 1, "ef_construction": 40, "ef_search": 64}, "hnsw_m"),
        ({"kind": "hnsw", "hnsw_m": 16, "ef_construction": 40, "ef_search": 0}, "ef_search"),
    ],
)
def test_spec_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        IndexSpec(**kwargs)


def test_spec_is_frozen_and_round_trips() -> None:
    spec = choose_index_spec(300_000, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.nprobe = 1  # type: ignore[misc]
    assert IndexSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown"):
        IndexSpec.from_dict({**spec.to_dict(), "bogus": 1})


def test_module_import_does_not_load_faiss() -> None:
    code = "import sys, dayloop.index.faiss_index; print('faiss' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
