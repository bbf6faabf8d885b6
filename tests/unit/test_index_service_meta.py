"""``index_meta.json`` as the index service reads it."""

from __future__ import annotations

import json

import pytest

from serving.index_service.errors import ServiceError
from serving.index_service.meta import parse_meta

FP = "0123456789abcdef" * 4


# ----------------------------------------------------------------------- meta


def meta(**fields) -> bytes:
    base = {"dim": 8, "n_items": 10, "fingerprint": FP, "spec": {"kind": "ivf", "nprobe": 4, "ef_search": 0}}
    base.update(fields)
    return json.dumps(base).encode()


def test_parse_meta_reads_what_the_index_stage_writes() -> None:
    m = parse_meta(meta())
    assert (m.dim, m.fingerprint, m.kind, m.nprobe, m.ef_search, m.n_items) == (8, FP, "ivf", 4, None, 10)
    m = parse_meta(meta(spec={"kind": "hnsw", "nprobe": None, "ef_search": 128}, n_items=None))
    assert (m.kind, m.nprobe, m.ef_search, m.n_items) == ("hnsw", None, 128, None)
    assert parse_meta(meta(fingerprint=FP.upper())).fingerprint == FP


@pytest.mark.parametrize(
    "raw",
    [b"{", b"[1]", b"\xff\xfe", meta(dim=0), meta(dim=True), meta(dim="8"), meta(fingerprint="abc"),
     meta(fingerprint=None), meta(spec=None), meta(spec={"kind": "lsh"}), meta(spec={"kind": "ivf", "nprobe": -1}),
     meta(n_items=-5)],
)
def test_parse_meta_refusals(raw: bytes) -> None:
    with pytest.raises(ServiceError) as err:
        parse_meta(raw)
    assert err.value.status == 422
