"""Multi-host training, proven with two processes on localhost (4 virtual CPU devices each,
gloo collectives) against one process with 8 devices, for the same meshes (data=8 and
data=4 x model=2): the PRAG bank and the Poly-z rows are bitwise equal (rows never reduce
across documents); the Poly inventory and routing table, and the DyPRAG translator, agree
within float32 reduction-order rounding (their gradients are all-reduces whose order differs). A process killed mid-run
(SIGKILL) ends the job within the heartbeat timeout, and a restart, with the same or another
number of processes, ends with the same bits. Bad multi-host settings fail in one line.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jprag.lora.store import load_bank
from jprag.poly.store import load_joint, load_rows
from jprag.translator.store import load_translator

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
MESHES = ("8x1", "4x2")
TIMEOUT = 400
# The Poly inventory's gradient is a mean over the step's documents, all-reduced across
# devices: a different summation order moves float32 results by a few ulps per step, which
# Adam can amplify where a gradient is at its noise floor. Observed: 1.8e-7.
POLY_ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(out: pathlib.Path, nproc: int, *flags: str) -> list[subprocess.Popen]:
    port, ndev = _free_port(), 8 // nproc
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([sys.executable, str(WORKER), str(out), str(i), str(nproc), str(port), str(ndev), *flags],
                             env=_env(), stdout=open(out / f"log{i}.txt", "a"), stderr=subprocess.STDOUT)
            for i in range(nproc)]


def _wait(procs: list[subprocess.Popen], out: pathlib.Path) -> None:
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((out / f"log{i}.txt").read_text()[-2000:] for i in range(len(procs)))
    assert codes == [0] * len(procs), logs


def _run(out: pathlib.Path, nproc: int, *flags: str) -> pathlib.Path:
    _wait(_start(out, nproc, *flags), out)
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("single"), 1)


def _assert_banks_equal(got, want):
    assert sorted(got) == sorted(want)
    for t in want:
        for k in ("a", "b"):
            assert np.array_equal(got[t][k], want[t][k]), f"{t}.{k} differs"
            assert np.abs(want[t][k]).max() > 0


def test_two_processes_equal_one(tmp_path, single):
    two = _run(tmp_path / "two", 2)
    for mesh in MESHES:
        bank1, index1 = load_bank(single / mesh / "bank")
        bank2, index2 = load_bank(two / mesh / "bank")
        assert index1["chunks"][0]["processes"] == 1 and index2["chunks"][0]["processes"] == 2
        _assert_banks_equal(bank2, bank1)
        # Poly-z rows: trained against one fixed inventory, independent per row
        z1, _ = load_rows(single / mesh / "rows")
        z2, _ = load_rows(two / mesh / "rows")
        assert np.array_equal(z1, z2), mesh
        # Poly joint: the inventory gradient is an all-reduce over the mesh
        inv1, r1, j1 = load_joint(single / mesh / "joint")
        inv2, r2, j2 = load_joint(two / mesh / "joint")
        assert j1["n_steps"] == j2["n_steps"]
        for t in inv1:
            for k in ("a", "b"):
                np.testing.assert_allclose(inv2[t][k], inv1[t][k], atol=POLY_ATOL, rtol=0, err_msg=f"{mesh} {t}.{k}")
        np.testing.assert_allclose(r2, r1, atol=POLY_ATOL, rtol=0)
        # the translator: replicated, trained on the (bitwise equal) banks; an all-reduced gradient
        _, t1, m1 = load_translator(single / mesh / "translator")
        _, t2, m2 = load_translator(two / mesh / "translator")
        assert m1["total_steps"] == m2["total_steps"] > 2  # checkpointed along the way (every 2 steps)
        for path, a in jax.tree_util.tree_flatten_with_path(t1)[0]:
            b = dict(jax.tree_util.tree_flatten_with_path(t2)[0])[path]
            np.testing.assert_allclose(b, a, atol=POLY_ATOL, rtol=0, err_msg=f"{mesh} translator {path}")


def _start_and_kill(out: pathlib.Path, nproc: int, victim: int) -> list[subprocess.Popen]:
    """Start a PRAG-only job of `nproc` processes that pauses after each chunk but the first,
    SIGKILL process `victim` once a chunk is on disk; returns the processes (victim dead)."""
    index_path = out / "8x1" / "bank" / "index.json"
    procs = _start(out, nproc, "--only-prag", "--slow-chunk")
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if index_path.is_file():
                chunks = json.loads(index_path.read_text())["chunks"]
                if any(c["done"] for c in chunks):
                    break
            assert all(p.poll() is None for p in procs), "a worker exited before the kill"
            time.sleep(0.5)
        else:
            pytest.fail("no chunk finished in time")
        time.sleep(2)
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(timeout=60)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    chunks = json.loads(index_path.read_text())["chunks"]
    assert any(c["done"] for c in chunks) and not all(c["done"] for c in chunks), "not killed mid-run"
    return procs


def test_a_killed_process_ends_the_job_and_a_restart_gets_the_same_bits(tmp_path, single):
    out = tmp_path / "killed"
    procs = _start_and_kill(out, 2, victim=1)
    # the survivor must not hang: JAX's heartbeat (10 s in the worker) ends it
    t0 = time.monotonic()
    try:
        code = procs[0].wait(timeout=90)
    finally:
        procs[0].kill()
    assert code != 0 and time.monotonic() - t0 < 90
    _run(out, 2, "--only-prag")
    _assert_banks_equal(load_bank(out / "8x1" / "bank")[0], load_bank(single / "8x1" / "bank")[0])


def test_a_bank_started_by_one_process_is_finished_by_two(tmp_path, single):
    """Resume with another process count: finished chunks are kept, the rest re-planned, the bits
    unchanged."""
    out = tmp_path / "one-then-two"
    _start_and_kill(out, 1, victim=0)
    _run(out, 2, "--only-prag")
    bank, index = load_bank(out / "8x1" / "bank")
    assert {c["processes"] for c in index["chunks"]} == {1, 2}
    _assert_banks_equal(bank, load_bank(single / "8x1" / "bank")[0])


def _jprag(*args: str, timeout: float = 120, devices: int | None = None) -> subprocess.CompletedProcess:
    env = _env() | ({"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"} if devices else {})
    return subprocess.run([sys.executable, "-m", "jprag.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "--process-id: must be in [0, 2)"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2"], "needs --num-processes and --process-id"),
    (["--coordinator", "nowhere", "--num-processes", "2", "--process-id", "0"], "--coordinator: expected HOST:PORT"),
    (["--num-processes", "2", "--process-id", "1"], "need --coordinator"),
])
def test_bad_multihost_flags(tmp_path, flags, message):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d", "passage": "p", "rewrite": "r",
                                "qa": [{"question": "q?", "answer": "a"}]}) + "\n")
    got = _jprag("encode", "--documents", str(docs), "--out", str(tmp_path / "bank"), *flags)
    assert got.returncode == 2, got.stderr
    lines = got.stderr.strip().splitlines()
    assert lines[-1].startswith("jprag: error: ") and message in lines[-1], got.stderr
    assert not (tmp_path / "bank" / "index.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--mesh-model", "3"], "--mesh-model 3: the model axis must divide the 8 devices"),
    (["--mesh-data", "5", "--mesh-model", "2"], "--mesh-data 5 x --mesh-model 2 needs 10 devices, have 8"),
])
def test_a_mesh_that_does_not_fit_the_devices(tmp_path, flags, message):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d", "passage": "p", "rewrite": "r",
                                "qa": [{"question": "q?", "answer": "a"}]}) + "\n")
    got = _jprag("encode", "--documents", str(docs), "--out", str(tmp_path / "bank"), *flags, devices=8)
    assert got.returncode == 2, got.stderr[-2000:]
    assert got.stderr.strip().splitlines()[-1] == f"jprag: error: {message}"
    assert not (tmp_path / "bank").exists()


def test_unreachable_coordinator_fails_within_the_timeout():
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    got = _jprag("eval", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
                 "--coordinator-timeout", "3", "--out", "unused")
    assert got.returncode == 2, got.stderr[-2000:]
    last = got.stderr.strip().splitlines()[-1]
    assert last.startswith("jprag: error: could not join the multi-host job") and f"127.0.0.1:{port}" in last
    assert time.monotonic() - t0 < 60
