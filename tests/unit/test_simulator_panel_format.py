"""The panel file as the simulator reads it: what the control plane writes reads here, and a
broken file is refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest

from dayloop.simulation.panel import write_panel
from serving.simulator.panel_format import load_panel


def test_panel_written_by_the_control_plane_reads_here(tmp_path) -> None:
    path = write_panel(tmp_path / "p.npz", [7, 3], [[30, 10], []], {"kind": "t"})
    panel = load_panel(path)
    assert panel.user_ids.tolist() == [3, 7]
    assert panel.relevant == {3: frozenset(), 7: frozenset({10, 30})}
    assert panel.meta["kind"] == "t"


def test_a_broken_panel_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_panel(tmp_path / "absent.npz")
    path = tmp_path / "bad.npz"
    np.savez(path, user_ids=np.array([1, 2]), rel_indptr=np.array([0, 3]),
             rel_items=np.array([1]), meta_json=np.array("{}"))
    with pytest.raises(ValueError, match="rel_indptr"):
        load_panel(path)
    np.savez(path, user_ids=np.array([], dtype=np.int64), rel_indptr=np.array([0]),
             rel_items=np.array([], dtype=np.int64), meta_json=np.array("{}"))
    with pytest.raises(ValueError, match="no users"):
        load_panel(path)
