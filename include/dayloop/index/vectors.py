"""Input checks shared by the index build, the recall check and the stage."""

from __future__ import annotations

import numpy as np


def check_vectors(name: str, x: np.ndarray, dim: int | None = None) -> np.ndarray:
    """``x`` as a contiguous float32 [n, dim] array, or ValueError naming ``name``."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {x.shape}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {x.dtype} (cast with .astype(np.float32))")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]}, expected {dim}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"{name} has {bad} row(s) with NaN or infinite values")
    # FAISS reads raw memory; a strided view would be silently misread.
    return np.ascontiguousarray(x)


def check_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """``ids`` as a contiguous int64 array of ``n`` unique non-negative ids, or ValueError."""
    if not isinstance(ids, np.ndarray):
        raise ValueError(f"ids must be a numpy array, got {type(ids).__name__}")
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    if ids.dtype != np.int64:
        raise ValueError(f"ids must be int64, got {ids.dtype} (cast with .astype(np.int64))")
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries but embeddings has {n} rows")
    if n and ids.min() < 0:
        # FAISS pads missing results with -1, so negative ids would be ambiguous.
        raise ValueError(f"ids must be >= 0 (FAISS uses -1 for 'no result'), min is {int(ids.min())}")
    uniq = np.unique(ids)
    if len(uniq) != n:
        raise ValueError(f"ids must be unique: {n - len(uniq)} duplicate(s)")
    return np.ascontiguousarray(ids)
