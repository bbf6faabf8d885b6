"""Index spec and the choice of index kind by catalogue size (pure; no FAISS needed)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

IndexKind = Literal["flat", "ivf", "hnsw"]


@dataclass(frozen=True)
class IndexSpec:
    """How to build and search one index. ``nlist``/``nprobe`` only matter for IVF,
    ``hnsw_m``/``ef_construction``/``ef_search`` only for HNSW."""

    kind: IndexKind
    metric: Literal["inner_product"] = "inner_product"
    nlist: int = 0
    nprobe: int = 0
    hnsw_m: int = 0
    ef_construction: int = 0
    ef_search: int = 0
    # k-means settings for IVF training; capped sample keeps training time bounded
    # (k-means cost is n_train * nlist * dim * iters).
    train_points_per_list: int = 64
    kmeans_iters: int = 15

    def __post_init__(self) -> None:
        if self.kind not in ("flat", "ivf", "hnsw"):
            raise ValueError(f"IndexSpec.kind must be 'flat', 'ivf' or 'hnsw', got {self.kind!r}")
        if self.metric != "inner_product":
            raise ValueError(f"IndexSpec.metric must be 'inner_product', got {self.metric!r}")
        if self.kind == "ivf":
            if self.nlist < 1:
                raise ValueError(f"IVF needs nlist >= 1, got {self.nlist}")
            if not 1 <= self.nprobe <= self.nlist:
                raise ValueError(f"IVF needs 1 <= nprobe <= nlist ({self.nlist}), got {self.nprobe}")
            if self.train_points_per_list < 1 or self.kmeans_iters < 1:
                raise ValueError("IVF needs train_points_per_list >= 1 and kmeans_iters >= 1")
        if self.kind == "hnsw":
            if self.hnsw_m < 2:
                raise ValueError(f"HNSW needs hnsw_m >= 2, got {self.hnsw_m}")
            if self.ef_construction < 1 or self.ef_search < 1:
                raise ValueError(
                    f"HNSW needs ef_construction >= 1 and ef_search >= 1, "
                    f"got {self.ef_construction} and {self.ef_search}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for index_meta.json and MLflow params)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown IndexSpec fields: {sorted(unknown)}")
        return cls(**data)


def choose_index_spec(
    n_items: int,
    dim: int,
    exact_threshold: int = 50_000,
    *,
    k: int = 100,
    approximate: Literal["ivf", "hnsw"] = "ivf",
) -> IndexSpec:
    """Pick an index for ``n_items`` vectors of ``dim`` floats (pure; no FAISS needed).

    * ``n_items < exact_threshold`` -> ``flat`` (IndexFlatIP). Brute force over 50k x 64
      floats is ~3 MFLOP per query, a few thousand queries per second batched on two
      cores, needs no training and is exact, so an approximation would only add risk.
    * above it, ``ivf`` by default. The catalogue is rebuilt daily and searched in
      batches; IVF trains in seconds-to-minutes, builds deterministically from a
      seed, costs no memory beyond the vectors, and its one knob (``nprobe``) is
      set at search time, so the gate can tune it without rebuilding.
      ``nlist ~ 4 * sqrt(n)`` balances the coarse-quantiser cost (nlist dot
      products) against list scanning (n / nlist * nprobe); it is clamped so every
      list gets at least 39 training points (below that k-means is unreliable) and
      to [16, 65536]. ``nprobe`` starts at nlist/64 + k/10 (at least 8; recall@k
      for large k needs neighbours from more lists); ``build_and_check`` doubles
      it while the measured recall is short, up to a quarter of the lists.
    * ``approximate='hnsw'`` picks HNSW instead: better latency for one-query-at-a-time
      serving, but ~2*M*4 extra bytes per item, a slower build, and a graph that is
      not bit-reproducible under multi-threaded insertion. ``M=32``,
      ``efConstruction=80``; ``efSearch`` starts at max(2k, 128).
    """
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if exact_threshold < 0:
        raise ValueError(f"exact_threshold must be >= 0, got {exact_threshold}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if approximate not in ("ivf", "hnsw"):
        raise ValueError(f"approximate must be 'ivf' or 'hnsw', got {approximate!r}")

    if n_items < exact_threshold:
        return IndexSpec(kind="flat")

    if approximate == "hnsw":
        return IndexSpec(kind="hnsw", hnsw_m=32, ef_construction=80, ef_search=max(2 * k, 128))

    nlist = min(max(16, int(round(4.0 * math.sqrt(n_items)))), 65_536)
    # The training-points rule wins over the lower bound; a tiny catalogue forced
    # past a near-zero threshold ends with one list, i.e. exact search.
    nlist = max(1, min(nlist, n_items // 39))
    # A base share of the lists plus one probe per 10 wanted results: a top-100
    # list spills over more clusters than a top-10 list.
    nprobe = max(8, math.ceil(nlist / 64) + math.ceil(k / 10))
    return IndexSpec(kind="ivf", nlist=nlist, nprobe=min(nprobe, nlist))
