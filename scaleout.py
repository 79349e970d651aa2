"""``rrstem analyze --cluster ADDRESS`` and ``--workers N``: a recorded scan reduced in partitions on Dask workers.

This process, the driver, opens the file and does what the service's
pipeline would do with the first frames messages ``simulators.source.stream``
sends: the scan's ``Scan`` calibrates its geometry on them, so the geometry is
the in-process one. The rest of the messages are grouped into partitions.
Each partition is one Dask task: it opens the file on its worker, by path (the
file must be readable at the same path there, as for LiberTEM and HyperSpy),
reads its frames lazily, reduces them with the same fused pass and reductions
into a ``stream.shard.Shard`` and returns the shard's msgpack bytes (no pickle
of results). The driver merges each as it completes (``Scan.merge``) and
counts partitions on a progress bar; shards hold disjoint positions, so
integer sums merge bit for bit, and the results file is written by the same
code as in-process (``stream.results``).

A worker lost mid-run costs only its partitions: the scheduler runs them
again on another worker (a partition's result depends only on the file and
the geometry), and the results are complete and equal.

The rrVAE (``scaleout_model.py``) trains here on frames the partition tasks sample across the scan, and
then, like a trained ``--model``, encodes every frame on the workers, its weights sent to them. Not yet:
``--save-frames`` and ``--publish`` (``check_options`` refuses them).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from pathlib import Path

import msgpack
import numpy as np
from tqdm import tqdm

from rrstem.simulators.files import open_file
from rrstem.simulators.source import Source, message_plan
from rrstem.stream.acquisition import AcquisitionMap
from rrstem.stream.config import ServiceConfig, make_encoder
from rrstem.stream.dpc.live import DPCSession
from rrstem.stream.persist import check_results_path
from rrstem.stream.preprocess import Geometry, PreprocessConfig
from rrstem.stream.protocol import Start, decode_header
from rrstem.stream.results import scan_results, write_scan
from rrstem.stream.scan import Scan
from rrstem.stream.shard import Shard, feed
from rrstem.stream.snapshot import MODEL_SPECS

log = logging.getLogger("rrstem.scaleout")

#: raw bytes of a partition unless ``--partition-frames`` says otherwise
PARTITION_BYTES = 128 << 20
#: raw bytes a worker reads from the file at a time
READ_BYTES = 32 << 20
#: test only: seconds each partition task waits before it returns (to kill a worker while tasks run)
DELAY_ENV = "RRSTEM_TEST_PARTITION_DELAY"


def check_options(args: argparse.Namespace) -> None:
    """ValueError, saying what to do, for what the partitioned path does not do yet."""
    refused = [(args.save_frames, "--save-frames"), (args.publish is not None, "--publish")]
    what = [text for on, text in refused if on]
    if what:
        raise ValueError(f"--cluster/--workers does not do {' or '.join(what)} for now; run without "
                         f"--cluster/--workers for that")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, not {args.workers}")
    if args.partition_frames is not None and args.partition_frames < 1:
        raise ValueError(f"--partition-frames must be at least 1, not {args.partition_frames}")


@contextlib.contextmanager
def dask_client(cluster: str | None, workers: int | None):
    """A Dask client of the cluster at ``cluster``, or of ``workers`` local worker processes (one thread each)."""
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines would drown rrstem's
    if cluster is not None:
        try:
            client = Client(cluster, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ValueError(f"cannot reach the Dask scheduler at {cluster}: {exc}") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as local, \
            Client(local) as client:
        yield client


def partitions(plan: list[tuple[int, int]], frames: int) -> list[list[tuple[int, int]]]:
    """The frames of ``plan`` (runs of (first, count)), in order, in partitions of ``frames`` frames (the last
    may hold fewer), each a list of runs."""
    out: list[list[tuple[int, int]]] = []
    room = 0
    for first, count in plan:
        while count:
            if room == 0:
                out.append([])
                room = frames
            take = min(count, room)
            out[-1].append((first, take))
            first, count, room = first + take, count - take, room - take
    return out


def reads(messages: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """``messages`` with consecutive ones joined into reads of at most ``limit`` frames."""
    out: list[tuple[int, int]] = []
    for first, count in messages:
        if out and out[-1][0] + out[-1][1] == first and out[-1][1] + count <= limit:
            out[-1] = (out[-1][0], out[-1][1] + count)
        else:
            out.append((first, count))
    return out


def warm_worker(dtype: str, bin: int) -> float:
    """On a worker: import the readers and compile (or load) the fused pass for ``dtype`` at ``bin``."""
    from rrstem.stream.framepass import warm_up

    return warm_up((dtype,), bins=(bin,))


def read_partition(path: str, open_args: dict, start: Start, cfg: PreprocessConfig, geometry: Geometry,
                   messages: list[tuple[int, int]]) -> Shard:
    """The frames of ``messages`` read from the file at ``path`` and reduced into a shard (on a worker)."""
    with open_file(path, **open_args) as src:
        shard = Shard(start, cfg, geometry, frames=sum(count for _, count in messages))
        placement = AcquisitionMap(tuple(start.scan_shape), open_args["sync_offset"], open_args["flyback"])
        for first, count in reads(messages, max(1, READ_BYTES // start.frame_nbytes)):
            feed(shard, placement, first, src.chunk(first, count))
    return shard


def reduce_partition(path: str, open_args: dict, start: Start, cfg: PreprocessConfig, geometry: Geometry,
                     messages: list[tuple[int, int]], train_frames: int = 0) -> bytes:
    """One task: ``read_partition``; msgpack of the shard's bytes and, for training, ``train_frames`` of its
    binned frames at random (``sample``) with their positions."""
    shard = read_partition(path, open_args, start, cfg, geometry, messages)
    out = {"shard": shard.to_bytes()}
    if train_frames:
        positions, frames = sample(*shard.binned(), train_frames)
        out["sample"] = [positions.tobytes(), frames.dtype.str, list(frames.shape), frames.tobytes()]
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    return msgpack.packb(out, use_bin_type=True)


def sample(positions: np.ndarray, frames: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` of the (positions, frames) at random (all if there are no more), the same for the same input."""
    if len(positions) <= count:
        return positions, frames
    rng = np.random.default_rng(int(positions[0]))
    pick = np.sort(rng.choice(len(positions), size=count, replace=False))
    return positions[pick], frames[pick]


def unpack_reduced(data: bytes) -> tuple[bytes, tuple[np.ndarray, np.ndarray] | None]:
    """(the shard's bytes, (positions, binned frames) of its sample or None) of ``reduce_partition``'s bytes."""
    d = msgpack.unpackb(data, raw=False)
    if "sample" not in d:
        return d["shard"], None
    positions, dtype, shape, frames = d["sample"]
    return d["shard"], (np.frombuffer(positions, np.int64), np.frombuffer(frames, np.dtype(dtype)).reshape(shape))


def analyze_partitioned(args: argparse.Namespace, src: Source, cfg: ServiceConfig) -> Scan:
    """Reduce ``src`` (the file ``args.input``) on a Dask cluster and write its results to ``cfg.out``, as
    ``analyze`` does in-process; returns the ended scan. ValueError (before any work) for what cannot be done."""
    check_options(args)
    check_results_path(cfg.out)
    scan, plan, calibrated = calibrate_here(src, cfg)
    start = scan.start
    own = scan.filled.copy()  # the positions of the frames this process took (their frames are in its store)
    encoder = make_encoder(cfg) if cfg.model is not None else None  # --model: a FixedEncoder, its thread unused
    per_partition = args.partition_frames or max(1, PARTITION_BYTES // start.frame_nbytes)
    parts = partitions(plan[calibrated:], per_partition)
    open_args = dict(key=args.key, scan_shape=args.scan_shape, sync_offset=cfg.sync_offset, flyback=cfg.flyback)
    path = str(Path(args.input).resolve())
    with dask_client(args.cluster, args.workers) as client:
        t0 = time.perf_counter()
        try:  # all at once, before the first partition: imports and the compiled pass (workers that join later
            # do it in their first partition)
            ready = client.run(warm_worker, start.dtype, cfg.preprocess.bin)
            log.info("%d worker(s) ready in %.2f s", len(ready), time.perf_counter() - t0)
        except Exception as exc:  # a worker lost meanwhile: its partitions go to the others
            log.warning("warming the workers up failed (%s); going on", exc)
        t0 = time.perf_counter()
        sampled, share = None, 0  # training: where the partitions' samples go, and how many frames each sends
        if cfg.train and encoder is None:
            from rrstem.scaleout_model import TRAIN_FRAMES, SampledScan

            sampled, share = SampledScan(scan), -(-TRAIN_FRAMES * per_partition // max(1, start.n_positions))
        futures = {client.submit(reduce_partition, path, open_args, start, cfg.preprocess, scan.geometry, messages,
                                 share, pure=False): messages for messages in parts}
        merge_as_completed(scan, futures, progress=not args.no_progress, sampled=sampled)
        log.info("%d partition(s) reduced on %d worker(s) in %.2f s", len(parts),
                 len(client.scheduler_info().get("workers", {})), time.perf_counter() - t0)
        scan.finish(sum(count for _, count in plan), "end")
        export = model_maps = failure = None
        try:  # as in-process, a model that fails costs the model's maps, not the scan's results
            if sampled is not None:
                encoder, export = train_here(scan, sampled, own, cfg)
            if encoder is not None:
                model_maps = encode_on_workers(client, scan, encoder, own, parts,
                                               (path, open_args, start, cfg.preprocess, scan.geometry),
                                               not args.no_progress)
        except Exception as exc:
            log.error("scan %s: the rrVAE failed: %s: %s", scan.scan_id, type(exc).__name__, exc)
            failure = exc
    results = scan_results(scan)
    results.attrs["config"] = cfg.model_dump(mode="json")
    if failure is not None:
        results.attrs["model_error"] = f"{type(failure).__name__}: {failure}"
    if model_maps is not None:
        from rrstem.scaleout_model import final_metrics

        results.maps.update(model_maps)
        results.specs.update(MODEL_SPECS)
        results.model = encoder.export() if export is None else {**export, "metrics": final_metrics(model_maps, scan)}
    scan.written(write_scan(cfg.out, results))
    scan.done_with()
    return scan


def calibrate_here(src: Source, cfg: ServiceConfig) -> tuple[Scan, list[tuple[int, int]], int]:
    """The scan, calibrated here on the first frames messages ``stream`` would send of ``src`` (those frames
    taken, as the service takes them); (scan, every message's (first, count), how many of them were taken)."""
    start = decode_header(src.start.encode())  # the start as the service would have received it
    if cfg.scan_shape is not None and tuple(start.scan_shape) != tuple(cfg.scan_shape):
        start = start.model_copy(update={"scan_shape": cfg.scan_shape})
    scan = Scan(start, cfg.preprocess, session={"dpc": DPCSession.open(**cfg.dpc.model_dump())})
    placement = AcquisitionMap(tuple(start.scan_shape), cfg.sync_offset, cfg.flyback)
    plan = message_plan(src, order=src.valid_order)
    taken = 0
    while taken < len(plan) and not scan.ready:
        first, count = plan[taken]
        feed(scan, placement, first, src.chunk(first, count))
        taken += 1
    return scan, plan, taken


def train_here(scan: Scan, sampled, own: np.ndarray, cfg: ServiceConfig):
    """Train the rrVAE here on the frames sampled across partitions and this process's own; (encoder, export)."""
    from rrstem.scaleout_model import train

    mine = np.flatnonzero(own & scan.filled)
    sampled.add(mine, scan.frames[mine])
    t0 = time.perf_counter()
    log.info("scan %s: training the rrVAE on %d frames sampled across the partitions", scan.scan_id,
             sampled.n_filled())
    encoder, export = train(sampled, cfg.trainer, cfg.device)
    log.info("scan %s: trained %d steps in %.1f s", scan.scan_id, export["step"], time.perf_counter() - t0)
    return encoder, export


def encode_partition(weights: dict, path: str, open_args: dict, start: Start, cfg: PreprocessConfig,
                     geometry: Geometry, messages: list[tuple[int, int]]) -> bytes:
    """One task: ``read_partition`` again, then its frames encoded with ``weights`` (``scaleout_model``)."""
    from rrstem.scaleout_model import encode_frames  # torch: only where a model encodes

    return encode_frames(weights, *read_partition(path, open_args, start, cfg, geometry, messages).binned())


def encode_on_workers(client, scan: Scan, encoder, own: np.ndarray, parts: list[list[tuple[int, int]]],
                      task_args: tuple, progress: bool) -> dict[str, np.ndarray]:
    """The encoder's final maps of the ended ``scan``: its weights sent to the workers once, each partition
    encoded there (``encode_partition``: ``task_args`` then its messages), this process's own frames here."""
    from distributed import as_completed

    from rrstem.scaleout_model import ModelMapsOfScan, encode_frames, weights_for_workers

    weights = weights_for_workers(encoder, scan, own)
    maps = ModelMapsOfScan(scan, encoder.model.cfg.latent_dim)
    mine = np.flatnonzero(own & scan.filled)
    maps.add(encode_frames(weights, mine, scan.frames[mine]))
    sent = client.scatter(weights, broadcast=True)
    t0 = time.perf_counter()
    futures = [client.submit(encode_partition, sent, *task_args, messages, pure=False) for messages in parts]
    with tqdm(total=len(futures), unit="partition", desc="encoding", disable=not progress, mininterval=0.5) as bar:
        for future in as_completed(futures):
            maps.add(future.result())
            future.release()
            bar.update(1)
    log.info("%d partition(s) encoded in %.2f s", len(parts), time.perf_counter() - t0)
    return maps.maps()


def merge_as_completed(scan: Scan, futures: dict, progress: bool, sampled=None) -> None:
    """Merge each partition's shard into ``scan`` as its task completes (``futures``: future -> its messages),
    its sample of frames into ``sampled`` (training), counting partitions on a progress bar; a task that raised
    raises here, naming its frames."""
    from distributed import as_completed

    with tqdm(total=len(futures), unit="partition", desc="partitions", disable=not progress,
              mininterval=0.5) as bar:
        for future in as_completed(list(futures)):
            messages = futures.pop(future)
            try:
                data = future.result()
            except Exception as exc:
                (first, _), (last, count) = messages[0], messages[-1]
                for other in futures:
                    other.cancel()
                raise RuntimeError(f"the partition of frames {first}..{last + count - 1} failed on a worker: "
                                   f"{type(exc).__name__}: {exc}") from exc
            future.release()
            shard, frames = unpack_reduced(data)
            scan.merge(*Shard.from_bytes(shard))
            if frames is not None:
                sampled.add(*frames)
            bar.update(1)
