"""The real tritonserver: versions side by side, load/unload under load, answers equal to
the exported TorchScript run in-process, and a broken version refused without harm."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.launch import DataPlane, PlaneConfig
from serving.triton.client import TritonAdmin, TritonAdminError
from serving.triton.model_config import model_config, to_pbtxt
from serving_helpers import free_port, make_bundle, serving_python

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return {v: make_bundle(root / f"v{v}", seed=v, dim=16 if v < 3 else 24) for v in (1, 2, 3)}


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    home = tmp_path_factory.mktemp("plane")
    cfg = PlaneConfig(home=home, python=serving_python(), triton_http=free_port(),
                      triton_grpc=free_port(), triton_metrics=free_port())
    plane = DataPlane(cfg)
    plane.start_triton()
    admin = TritonAdmin(f"127.0.0.1:{cfg.triton_http}", cfg.triton_repository, cfg.triton_staging)
    try:
        yield admin
    finally:
        plane.stop()
        assert plane.pgid("triton") is None


def in_process(bundle_dir, ids):
    import torch

    model = torch.jit.load(str(bundle_dir / "serving_tower.pt"))
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64).reshape(-1, 1))).numpy()


def test_two_versions_side_by_side_equal_in_process(triton, bundles):
    for v in (1, 2):
        out = triton.load_version(v, bundles[v] / "serving_tower.pt")
        assert out["loaded"] is True
    assert triton.ready_versions() == [1, 2]
    ids = np.array([7, 14, 21, 700, 1400, 999_999, 0], dtype=np.int64)  # last two unknown
    for v in (1, 2):
        got = triton.infer(v, ids)
        np.testing.assert_allclose(got, in_process(bundles[v], ids), rtol=0, atol=1e-6)
    assert not np.allclose(triton.infer(1, ids), triton.infer(2, ids))
    # loading again is a no-op
    assert triton.load_version(1, bundles[1] / "serving_tower.pt")["loaded"] is False


def test_load_and_unload_under_load_never_fail_the_serving_version(triton, bundles):
    triton.load_version(1, bundles[1] / "serving_tower.pt")
    triton.unload_version(2)
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []

    def hammer():
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(triton.url)
        inp = httpclient.InferInput("USER_ID__0", [1, 1], "INT64")
        inp.set_data_from_numpy(np.array([[7]], dtype=np.int64))
        while not stop.is_set():
            try:
                client.infer("user_tower", [inp], model_version="1")
                counts["ok"] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                counts["failed"] += 1
                errors.append(str(exc)[:200])

    t = threading.Thread(target=hammer)
    t.start()
    try:
        time.sleep(0.5)
        t0 = time.perf_counter()
        triton.load_version(2, bundles[2] / "serving_tower.pt")
        load_s = time.perf_counter() - t0
        assert triton.ready_versions() == [1, 2]
        t0 = time.perf_counter()
        triton.unload_version(2)
        unload_s = time.perf_counter() - t0
        assert triton.ready_versions() == [1]
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    print(f"\nload {load_s:.2f}s unload {unload_s:.3f}s; {counts['ok']} requests on v1 meanwhile")
    assert counts["failed"] == 0, errors[:3]
    assert counts["ok"] > 50


def test_broken_model_is_refused_and_nothing_else_changes(triton, bundles, tmp_path):
    triton.load_version(1, bundles[1] / "serving_tower.pt")
    before = triton.ready_versions()
    bad = tmp_path / "serving_tower.pt"
    bad.write_bytes(b"not a torchscript archive")
    with pytest.raises(TritonAdminError, match="v9"):
        triton.load_version(9, bad)
    assert triton.ready_versions() == before
    assert 9 not in [int(p.name) for p in (triton.repository / "user_tower").iterdir() if p.name.isdigit()]
    np.testing.assert_allclose(triton.infer(1, [7]), in_process(bundles[1], [7]), atol=1e-6)


def test_versions_are_immutable(triton, bundles):
    triton.load_version(1, bundles[1] / "serving_tower.pt")
    with pytest.raises(ValueError, match="immutable"):
        triton.load_version(1, bundles[2] / "serving_tower.pt")


def test_a_version_with_another_width_serves_beside_the_others(triton, bundles):
    triton.load_version(3, bundles[3] / "serving_tower.pt")
    assert triton.infer(3, [7]).shape == (1, 24)
    assert triton.infer(1, [7]).shape == (1, 16)
    triton.unload_version(3)


def test_gpu_config_comes_from_the_same_source():
    cpu, gpu = model_config("cpu", [4, 5]), model_config("gpu", [4, 5])
    assert cpu["input"] == gpu["input"] and cpu["output"] == gpu["output"]
    text = to_pbtxt(gpu)
    assert 'backend: "pytorch"' in text and "kind: KIND_GPU" in text
    assert "versions: [4, 5]" in text
    assert 'backend: "python"' in to_pbtxt(cpu) and "KIND_CPU" in to_pbtxt(cpu)
