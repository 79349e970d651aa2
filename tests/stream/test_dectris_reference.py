"""The DECTRIS decoders and simulator against code and documents we did not write.

References (see docs/protocol.md, "Checked against"):
- DECTRIS's ``dectris-compression`` (the vendor's decompressor, PyPI): it decodes what our codec writes;
- HDF5's Bitshuffle and LZ4 filters (``hdf5plugin``, writing through h5py): our codec decodes the chunks
  they write, which is the framing DECTRIS documents for tag 56500 and for stream v1's ``bs*-lz4<``;
- LiberTEM-rs' ``libertem_dectris`` (PyPI), the DECTRIS stream v1 code LiberTEM-live runs: its simulator
  streams into ``rrstem serve --protocol simplon``, and its receiver takes what our simulator sends;
- DECTRIS's stream2 documentation (dectris/documentation, stream_v2/README.md and
  cbor/dectris-compression-tag.md): no DECTRIS stream2 sender runs without a DCU, so the stream2 messages
  here are built by hand from that documented layout, with pixels compressed by the HDF5 filters, not by
  our encoder.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading

import cbor2
import h5py
import hdf5plugin
import libertem_dectris
import numpy as np
import pytest
import zmq
from dectris.compression import decompress as dectris_decompress

from support import reference, wait_results
from rrstem.simulators.dectris import SimplonEncoder, Stream2Encoder, stream_detector
from rrstem.simulators.source import ArraySource
from rrstem.stream.detectors.codecs import compress, decompress
from rrstem.stream.detectors.stream2 import Stream2Decoder
from rrstem.stream.protocol import Start
from rrstem.stream.results import read_scan

NY, NX = 4, 5
SHAPES = [(17, 19), (64, 64), (96, 131)]  # partial last blocks, leftover elements (< 8), several 8 kB blocks


def frame_of(shape, dtype, seed=0):
    """A detector-like frame: mostly small counts, some zeros, a few values near the top of the type."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    f = rng.poisson(3, size=shape).astype(np.int64)
    f[rng.random(shape) < 0.01] = top - 1
    return f.astype(np.dtype(dtype).newbyteorder("<"))


def hdf5_chunk(tmp_path, frame, compression):
    """The bytes HDF5's own filter writes for ``frame`` as one chunk: an encoder we did not write."""
    with h5py.File(tmp_path / "chunk.h5", "w") as f:
        f.create_dataset("d", data=frame, chunks=frame.shape, **compression)
    with h5py.File(tmp_path / "chunk.h5", "r") as f:
        mask, chunk = f["d"].id.read_direct_chunk((0,) * frame.ndim)
    assert mask == 0  # the filter was applied, not skipped
    return chunk


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("algorithm", ["bslz4", "lz4"])
def test_dectris_compression_decodes_what_our_codec_writes(algorithm, dtype, shape):
    frame = frame_of(shape, dtype)
    packed = compress(frame, algorithm)
    out = dectris_decompress(packed, algorithm, elem_size=frame.itemsize)
    np.testing.assert_array_equal(np.frombuffer(out, frame.dtype).reshape(shape), frame)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("algorithm", ["bslz4", "lz4"])
def test_our_codec_decodes_the_hdf5_filters_framing(tmp_path, algorithm, dtype, shape):
    frame = frame_of(shape, dtype, seed=1)
    filt = hdf5plugin.Bitshuffle(cname="lz4") if algorithm == "bslz4" else hdf5plugin.LZ4()
    chunk = hdf5_chunk(tmp_path, frame, filt)
    assert int.from_bytes(chunk[:8], "big") == frame.nbytes  # the 12-byte header DECTRIS's parser reads
    ours = np.frombuffer(decompress(chunk, algorithm, frame.itemsize, frame.nbytes), frame.dtype)
    np.testing.assert_array_equal(ours.reshape(shape), frame)
    vendor = np.frombuffer(dectris_decompress(chunk, algorithm, elem_size=frame.itemsize), frame.dtype)
    np.testing.assert_array_equal(vendor.reshape(shape), frame)  # the same bytes are what DECTRIS reads


# --- stream2, built by hand from DECTRIS's documented layout --------------------------------------


def _documented_start(h, w, dtype="uint16", **extra):
    # The field names, types and units of stream_v2/README.md "Start Message"; type is the first key.
    return {"type": "start", "series_id": 15614, "series_unique_id": "01HBV3JPF9T4ZDPADX6EMK6XMZ",
            "arm_date": cbor2.CBORTag(0, "2023-10-03T17:47:48.329+02:00"), "beam_center_x": w / 2,
            "beam_center_y": h / 2, "channels": ["threshold_1", "threshold_2"], "count_time": 0.001,
            "countrate_correction_enabled": True, "detector_description": "Dectris ARINA Si 128K",
            "detector_serial_number": "E-00-0000", "detector_translation": [0.01, 0.02, -0.25],
            "flatfield_enabled": True, "frame_time": 0.001, "image_dtype": dtype, "image_size_x": w,
            "image_size_y": h, "incident_energy": 200000.0, "incident_wavelength": 0.02508,
            "number_of_images": NY * NX, "pixel_mask_enabled": True, "pixel_size_x": 100e-6,
            "pixel_size_y": 100e-6, "saturation_value": 65534, "sensor_material": "Si",
            "sensor_thickness": 0.00045, "threshold_energy": {"threshold_1": 100000.0, "threshold_2": 150000.0},
            "virtual_pixel_interpolation_enabled": True, **extra}


def _documented_image(image_id, channels: dict):
    # stream_v2/README.md "Image Message": Rational times, tag 0 date, data: channel -> tag 40 [[h, w], array].
    return {"type": "image", "series_id": 15614, "series_unique_id": "01HBV3JPF9T4ZDPADX6EMK6XMZ",
            "image_id": image_id, "real_time": [1000, 1_000_000],
            "series_date": cbor2.CBORTag(0, "2023-10-03T17:47:49.434+02:00"),
            "start_time": [1000 * image_id, 1_000_000], "stop_time": [1000 * image_id + 1000, 1_000_000],
            "data": channels}


def _self_described(msg) -> bytes:
    return b"\xd9\xd9\xf7" + cbor2.dumps(msg)


def test_stream2_messages_of_the_documented_layout_decode(tmp_path):
    """Two channels, bslz4 and lz4 from HDF5's filters and a raw one; image ids 0-based; a real DCU's prefix."""
    h, w = 24, 40  # not square: the dimensions are [height, width] (row major, RFC 8746)
    frames = [frame_of((h, w), np.uint16, seed=k) for k in range(3)]
    other = frame_of((h, w), np.uint16, seed=9)  # threshold_2: must not be the one used
    chunks = [hdf5_chunk(tmp_path, frames[0], hdf5plugin.Bitshuffle(cname="lz4")),
              hdf5_chunk(tmp_path, frames[1], hdf5plugin.LZ4()), frames[2].tobytes()]
    payloads = [cbor2.CBORTag(56500, ["bslz4", 2, chunks[0]]), cbor2.CBORTag(56500, ["lz4", 0, chunks[1]]),
                chunks[2]]
    dec = Stream2Decoder((NY, NX))
    items = dec.decode([zmq.Frame(_self_described(_documented_start(h, w)))])
    assert [i.kind for i in items] == ["start"]  # image_dtype and size known: the scan starts at the start
    start = items[0].message
    assert start.scan_id == "01HBV3JPF9T4ZDPADX6EMK6XMZ" and start.frame_shape == (h, w) and start.dtype == "uint16"
    assert start.calibration.energy_kev == pytest.approx(200.0)
    assert start.calibration.detector_pixel_mrad == pytest.approx(1000 * np.arctan(100e-6 / 0.25))
    assert start.metadata["threshold_energy"] == 100000.0 and start.metadata["channel"] == "threshold_1"
    assert start.metadata["arm_date"].startswith("2023-10-03T17:47:48.329")
    for k, payload in enumerate(payloads):
        data = {"threshold_1": cbor2.CBORTag(40, [[h, w], cbor2.CBORTag(69, payload)]),
                "threshold_2": cbor2.CBORTag(40, [[h, w], cbor2.CBORTag(69, other.tobytes())])}
        (item,) = dec.decode([zmq.Frame(_self_described(_documented_image(k, data)))])
        assert item.kind == "frames", item.detail
        assert item.message.first == k and item.frames.shape == (1, h, w)
        np.testing.assert_array_equal(item.frames[0], frames[k])
    end = {"type": "end", "series_id": 15614, "series_unique_id": "01HBV3JPF9T4ZDPADX6EMK6XMZ"}
    (item,) = dec.decode([zmq.Frame(_self_described(end))])
    assert item.kind == "end" and item.message.frames_sent == 3


def test_stream2_start_without_image_dtype_starts_at_the_first_image():
    """A 2023 EIGER2 start message has no image_dtype: the first image's typed-array tag (70: <u4) gives it."""
    h, w = 8, 8
    msg = _documented_start(h, w)
    del msg["image_dtype"]
    dec = Stream2Decoder((NY, NX))
    assert dec.decode([zmq.Frame(_self_described(msg))]) == []
    frame = frame_of((h, w), np.uint32)
    image = _documented_image(0, {"threshold_1": cbor2.CBORTag(40, [[h, w], cbor2.CBORTag(70, frame.tobytes())])})
    start, frames = dec.decode([zmq.Frame(cbor2.dumps(image))])  # without the prefix too
    assert start.kind == "start" and start.message.dtype == "uint32"
    np.testing.assert_array_equal(frames.frames[0], frame)


def _documented_decode(raw: bytes):
    """A reader written from DECTRIS's documentation alone: tags 40, 64/69/70 and 56500 (dectris-compression)."""
    typed = {64: "u1", 69: "<u2", 70: "<u4"}

    def hook(*args):  # cbor2 >= 6 calls hook(tag, immutable), older ones hook(decoder, tag)
        tag = next(a for a in args if isinstance(a, cbor2.CBORTag))
        if tag.tag == 56500:
            algorithm, elem_size, data = tag.value
            return dectris_decompress(data, algorithm, elem_size=elem_size)
        if tag.tag in typed:
            return np.frombuffer(tag.value, typed[tag.tag])
        if tag.tag == 40:
            dims, array = tag.value
            return array.reshape(dims)
        return tag

    assert raw[:3] == b"\xd9\xd9\xf7"  # DECTRIS's own parser refuses a message without it
    return cbor2.loads(raw, tag_hook=hook)


@pytest.mark.parametrize("compression", ["none", "lz4", "bslz4"])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
def test_our_stream2_sender_reads_as_documented(compression, dtype):
    h, w = 24, 40
    start = Start(scan_id="sim-1", scan_shape=(NY, NX), frame_shape=(h, w), dtype=dtype,
                  calibration={"energy_kev": 200.0, "detector_pixel_mrad": 0.5})
    enc = Stream2Encoder(start, series=3, compression=compression)
    head = _documented_decode(enc.header()[0])
    assert next(iter(head)) == "type" and head["type"] == "start"  # the first key, as DECTRIS's parser reads it
    documented = {"arm_date", "beam_center_x", "beam_center_y", "channels", "count_time",
                  "countrate_correction_enabled", "detector_description", "detector_serial_number",
                  "detector_translation", "flatfield_enabled", "frame_time", "image_dtype", "image_size_x",
                  "image_size_y", "incident_energy", "incident_wavelength", "number_of_images",
                  "pixel_mask_enabled", "pixel_size_x", "pixel_size_y", "saturation_value", "series_id",
                  "series_unique_id", "threshold_energy", "virtual_pixel_interpolation_enabled"}
    assert documented <= set(head), documented - set(head)
    assert (head["image_size_x"], head["image_size_y"], head["image_dtype"]) == (w, h, dtype)
    assert head["incident_wavelength"] == pytest.approx(0.02508, abs=1e-5)  # 200 keV electrons, in angstroms
    assert set(head["threshold_energy"]) == set(head["channels"]) == {"threshold_1"}
    frame = frame_of((h, w), dtype, seed=4)
    msg = _documented_decode(enc.image(0, frame)[0])
    assert msg["image_id"] == 0 and list(msg["data"]) == list(head["channels"])
    np.testing.assert_array_equal(msg["data"]["threshold_1"], frame)
    end = _documented_decode(enc.end()[0])
    assert dict(end) == {"type": "end", "series_id": 3, "series_unique_id": "sim-1"}


# --- stream v1 against LiberTEM-rs (libertem_dectris) ----------------------------------------------


def test_libertem_dectris_simulator_streams_into_the_service(make_service):
    """LiberTEM-rs' mock DCU: header and config as two messages, bs16-lz4< frames whose 12-byte header is zero."""
    sim = libertem_dectris.DectrisSim.new_mocked(uri="tcp://127.0.0.1", num_frames=NY * NX, random_port=True)
    svc = make_service(protocol="simplon", scan_shape=(NY, NX), listen=sim.get_uri(), bind=False)
    errors = []

    def run():
        try:
            sim.send_headers()
            sim.send_frames()
            sim.send_footer()
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    sender = threading.Thread(target=run, daemon=True)
    sender.start()
    res = read_scan(wait_results(svc, timeout=60.0))
    sender.join(30)
    assert not errors
    assert res["scan_id"] == "series-34"  # the mock's series number
    # every frame arrives and decodes; the mock's frame 0 is all zero: a measurement with no counts (filled,
    # VBF 0, no COM), counted as zero_counts
    assert res["attrs"]["counters"] == {"received": 20, "missing": 0, "duplicate": 0, "invalid": 0, "stale": 0,
                                        "dropped": 0}
    assert res["attrs"]["invalid_reasons"] == {} and res["attrs"]["zero_counts"] == 1
    assert res["attrs"]["frame_shape"].tolist() == [512, 512]
    # the mock's frames: 512x512 uint16, every pixel of frame i is i
    frames = np.broadcast_to(np.arange(NY * NX, dtype=np.uint16)[:, None, None], (NY * NX, 512, 512))
    filled = res["maps"]["filled"]
    assert filled.all() and np.isnan(res["maps"]["com_x"][0, 0]) and res["maps"]["vbf"][0, 0] == 0
    with np.errstate(invalid="ignore"):  # frame 0's COM is 0/0 in the reference too
        ref = reference(frames.reshape(NY, NX, 512, 512), res["attrs"]["geometry"], res.get("pixel_mask"), filled)
    for name in ("vbf", "vadf"):
        np.testing.assert_array_equal(res["maps"][name][filled], ref[name][filled])
    assert res["maps"]["vbf"][NY - 1, NX - 1] == 19 * ref["vbf"][0, 1]  # frame 19 is 19 times frame 1
    assert res["attrs"]["calibration"]["energy_kev"] is None  # the mock reports no energy...
    assert res["attrs"]["calibration"]["detector_pixel_mrad"] is None  # ...and a detector distance of 0


@pytest.mark.parametrize("compression", ["bslz4", "lz4"])  # LiberTEM-rs decodes these encodings only
def test_libertem_dectris_receives_our_simplon_simulator(compression):
    h, w = 32, 48  # not square: dimage_d's shape is [x, y], and LiberTEM reverses it into (h, w)
    rng = np.random.default_rng(2)
    frames = rng.poisson(5, size=(NY, NX, h, w)).astype(np.uint16)
    start = Start(scan_id="libertem", scan_shape=(NY, NX), frame_shape=(h, w), dtype="uint16")
    endpoints, done = [], threading.Event()

    def send():
        try:
            stream_detector(ArraySource(frames, start), "tcp://127.0.0.1:0", protocol="simplon",
                            compression=compression, series=11, progress=False, timeout=30.0,
                            on_endpoint=endpoints.append)
        finally:
            done.set()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    while not endpoints and not done.is_set():  # the simulator reports its endpoint once bound
        done.wait(0.01)
    assert endpoints, "the simulator did not bind"
    handle = os.path.join(tempfile.mkdtemp(prefix="lt", dir="/tmp"), "shm")  # a short socket path
    conn = libertem_dectris.DectrisConnection(uri=endpoints[0], frame_stack_size=4, handle_path=handle,
                                              num_slots=64, bytes_per_frame=h * w * 2, huge=False)
    got = []
    try:
        conn.start_passive()
        arm = None
        for _ in range(300):  # 30 s at most
            arm = conn.wait_for_arm(timeout=0.1)
            if arm is not None:
                break
        assert arm is not None, "LiberTEM never saw the series header"
        config, series = arm
        assert series == 11 and config.get_num_frames() == NY * NX
        client = libertem_dectris.CamClient(conn.get_socket_path())
        try:
            while sum(len(g) for g in got) < NY * NX:
                stack = conn.get_next_stack(max_size=8)
                if stack is None:
                    break
                shape = tuple(reversed(stack.get_shape()))  # LiberTEM's own reading of dimage_d's shape
                buf = np.zeros((len(stack),) + shape, dtype=np.dtype(stack.get_dtype_string()))
                client.decode_range_into_buffer(stack, buf, 0, len(stack))
                client.done(stack)
                got.append(buf)
        finally:
            client.close()
    finally:
        conn.close()
        sender.join(30)
    np.testing.assert_array_equal(np.concatenate(got), frames.reshape(-1, h, w))


def test_our_simplon_header_has_what_libertem_requires():
    """LiberTEM-rs' DetectorConfig needs these keys; its DImage/DImageD/DConfig these fields."""
    start = Start(scan_id="s", scan_shape=(NY, NX), frame_shape=(32, 48), dtype="uint16")
    enc = SimplonEncoder(start, series=5, compression="bslz4")
    head, config = (json.loads(p) for p in enc.header())
    assert head == {"htype": "dheader-1.0", "series": 5, "header_detail": "basic"}
    assert (config["x_pixels_in_detector"], config["y_pixels_in_detector"], config["bit_depth_image"]) == (48, 32, 16)
    assert (config["trigger_mode"], config["ntrigger"], config["nimages"]) == ("exte", NY * NX, 1)
    dimage, dimage_d, blob, dconfig = enc.image(7, np.zeros((32, 48), np.uint16))
    assert json.loads(dimage)["frame"] == 7 and json.loads(dimage)["series"] == 5
    d = json.loads(dimage_d)
    assert (d["shape"], d["type"], d["encoding"], d["size"]) == ([48, 32], "uint16", "bs16-lz4<", len(blob))
    assert set(json.loads(dconfig)) == {"htype", "start_time", "stop_time", "real_time"}
