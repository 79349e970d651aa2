"""``rrstem analyze`` on Dask (``rrstem/scaleout.py``): a scheduler and two workers started here, as a user or a
facility's batch script starts them (``dask scheduler``, ``dask worker``), and ``--workers 2``: every map, the
mean pattern and the counters equal those of the in-process ``analyze`` of the same file, bit for bit (integer
counts), also when a worker is killed while its partitions run. The rrVAE trained on frames sampled across the
partitions encodes every frame on the workers as the same weights do in-process (``--model``), to float32
rounding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from file_writers import write_dectris
from support import disc_frames
from rrstem.cli import main
from rrstem.model.interface import MAPS
from rrstem.scaleout import DELAY_ENV, partitions, reads
from rrstem.stream.results import read_scan

pytest.importorskip("distributed")
DASK = Path(sys.executable).with_name("dask")
ANALYZE = [sys.executable, "-m", "rrstem.cli", "analyze", "--no-train", "--no-progress"]


#: a DECTRIS master file of a flat series: 3 frames before the scan's first, 2 flyback frames per line
DECTRIS_OPTIONS = ["--scan-shape", "20x24", "--sync-offset", "3", "--flyback", "2", "--bin", "4"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A 24x24 scan of 128x128 uint16 frames (36 MB: 9 frames messages of 64 frames; a few frames hold counts
    that do not fit a uint16 store at bin 4), a DECTRIS master file (DECTRIS_OPTIONS, a bad pixel in its
    pixel_mask), and the in-process results of both."""
    folder = tmp_path_factory.mktemp("scaleout")
    frames = disc_frames(24, 24, 128, 128, seed=3, level=2000.0)
    frames[20, 3, 60:64, 60:64] = 60000  # the narrow store widens in one partition
    np.save(folder / "scan.npy", frames)
    assert main(["analyze", str(folder / "scan.npy"), "--no-train", "--no-progress", "--bin", "4",
                 "--out", str(folder / "inprocess.h5")]) == 0
    (folder / "dectris").mkdir()
    mask = np.zeros((128, 128), np.uint32)
    mask[70, 50] = 1
    flat = disc_frames(1, 3 + 20 * 26, 128, 128, seed=5, level=300.0)  # (1, n, h, w): one flat series
    write_dectris(folder / "dectris", flat, per_file=100, pixel_mask=mask)
    assert main(["analyze", str(folder / "dectris" / "scan_master.h5"), "--no-train", "--no-progress",
                 *DECTRIS_OPTIONS, "--out", str(folder / "dectris_inprocess.h5")]) == 0
    return folder


def assert_same_results(a_path: Path, b_path: Path, positions: int = 24 * 24) -> None:
    """Every map and attribute of two results files equal, bit for bit; the rrVAE's, where only ``b`` has one,
    aside."""
    a, b = read_scan(a_path), read_scan(b_path)
    assert sorted(a["maps"]) == sorted(set(b["maps"]) - (set(MAPS) - set(a["maps"])))
    for name, ref in a["maps"].items():
        assert np.array_equal(ref, b["maps"][name], equal_nan=ref.dtype.kind == "f"), name
    assert np.array_equal(a["mean_pattern"], b["mean_pattern"])
    assert a["map_attrs"] == b["map_attrs"]
    for key in set(a["attrs"]) | set(b["attrs"]):
        if key != "config":  # the in-process one names its inproc:// endpoint
            assert json.dumps(a["attrs"].get(key), default=str) == json.dumps(b["attrs"].get(key), default=str), key
    assert a["attrs"]["counters"]["received"] == positions and a["attrs"]["complete"]


def test_partitions_cover_the_plan_in_order():
    plan = [(0, 64), (64, 64), (130, 10)]
    parts = partitions(plan, 50)
    assert parts == [[(0, 50)], [(50, 14), (64, 36)], [(100, 28), (130, 10)]]
    assert reads([(0, 5), (5, 5), (12, 3), (15, 9)], 10) == [(0, 10), (12, 3), (15, 9)]


def test_two_local_workers_equal_the_in_process_results_and_train_the_rrvae(recorded, tmp_path):
    out = tmp_path / "workers.h5"
    # 40 steps, however busy the machine (the time bound stays out of reach)
    trainer = json.dumps({"consolidate_steps": 40, "consolidate_seconds": 300.0, "consolidate_eval_steps": 20})
    done = subprocess.run([sys.executable, "-m", "rrstem.cli", "analyze", str(recorded / "scan.npy"), "--bin", "4",
                           "--no-progress", "--trainer", trainer, "--workers", "2", "--partition-frames", "100",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"results of scan scan: {out}" in done.stdout
    assert_same_results(recorded / "inprocess.h5", out)  # every reduction, bit for bit
    trained = read_scan(out)
    assert trained["model"]["step"] == 40 and len(trained["training"]["loss"]) == 4  # a history point per 10
    assert np.isfinite(trained["maps"]["latent"]).all() and trained["maps"]["latent"].shape[1:] == (24, 24)
    # the maps are the kept model's encoding of every frame on the workers: as the same weights encode in-process
    check = tmp_path / "check.h5"
    assert main(["analyze", str(recorded / "scan.npy"), "--bin", "4", "--no-progress", "--model", str(out),
                 "--out", str(check)]) == 0
    for name in MAPS:
        ref = read_scan(check)["maps"][name]
        np.testing.assert_allclose(trained["maps"][name], ref, rtol=1e-5, atol=1e-6 * np.nanmax(np.abs(ref)),
                                   err_msg=name)  # torch's batches differ in size: float32 rounding
    assert np.isfinite(trained["metrics"]["rotation_r"])  # the trainer's metrics, of the final maps


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, random ports, one thread per worker."""

    def __init__(self, folder: Path, workers: int = 2):
        self.file = folder / "scheduler.json"
        quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.scheduler = subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                           "--no-dashboard", "--scheduler-file", str(self.file)], **quiet)
        deadline = time.monotonic() + 30
        while not self.file.exists() or not self.file.read_text().strip():
            assert time.monotonic() < deadline and self.scheduler.poll() is None, "the scheduler did not start"
            time.sleep(0.05)
        time.sleep(0.1)  # the file is written whole, but give it a moment
        self.address = json.loads(self.file.read_text())["address"]
        env = {**os.environ, DELAY_ENV: "0.1"}  # each partition task waits: the kill lands while tasks run
        self.workers = [subprocess.Popen([str(DASK), "worker", self.address, "--host", "127.0.0.1", "--nthreads", "1",
                                          "--no-nanny", "--no-dashboard", "--name", f"w{i}"], env=env, **quiet)
                        for i in range(workers)]

    def close(self) -> None:
        for proc in (*self.workers, self.scheduler):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()



@pytest.fixture
def cluster(tmp_path):
    from distributed import Client

    c = Cluster(tmp_path)
    try:
        with Client(c.address, timeout="20s") as client:
            client.wait_for_workers(2, timeout=60)
            c.client = client
            yield c
    finally:
        c.close()


def run_on(cluster: Cluster, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([*ANALYZE, *args, "--cluster", cluster.address, "--partition-frames", "16", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_dask_cluster_equals_the_in_process_results_and_survives_a_killed_worker(recorded, cluster, tmp_path):
    # a flat series in HDF5 data files, its sync offset and flyback frames placed (and counted) by the workers
    dectris = tmp_path / "dectris.h5"
    proc = run_on(cluster, dectris, str(recorded / "dectris" / "scan_master.h5"), *DECTRIS_OPTIONS)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert_same_results(recorded / "dectris_inprocess.h5", dectris, positions=20 * 24)
    invalid = read_scan(dectris)["attrs"]["invalid_reasons"]
    assert invalid == {"sync_offset": 3, "flyback": 20 * 2}

    # the .npy, and kill one worker while both run partitions (32 tasks of 0.1 s or more each)
    killed = tmp_path / "killed.h5"
    proc = run_on(cluster, killed, str(recorded / "scan.npy"), "--bin", "4")
    victim = cluster.workers[1]
    names = {}
    deadline = time.monotonic() + 60
    while True:
        names = {info["name"]: addr for addr, info in cluster.client.scheduler_info()["workers"].items()}
        busy = {addr for addr, tasks in cluster.client.processing().items() if tasks}
        if names.get("w1") in busy and names.get("w0") in busy:
            break
        assert time.monotonic() < deadline and proc.poll() is None, "the partitions never ran on both workers"
        time.sleep(0.02)
    time.sleep(0.4)  # a few partitions are done on each worker by now
    while not cluster.client.processing()[names["w1"]]:  # kill it while it holds a task (each takes >= 0.1 s)
        assert proc.poll() is None, "the scan ended before the worker was killed"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert victim.wait(5) == -signal.SIGKILL
    assert len(cluster.client.scheduler_info()["workers"]) == 1  # the other worker ran the killed one's tasks
    assert_same_results(recorded / "inprocess.h5", killed)


def test_what_the_workers_do_not_do_yet_is_refused_before_any_work(recorded, tmp_path, capsys):
    out = tmp_path / "r.h5"
    code = main(["analyze", str(recorded / "scan.npy"), "--workers", "2", "--no-progress", "--save-frames",
                 "--no-train", "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "does not do --save-frames for now" in capsys.readouterr().err
