"""DECTRIS SIMPLON stream (legacy) and stream2 over real sockets: the service's maps equal a NumPy reduction."""

import json

import cbor2
import numpy as np
import pytest
import zmq

from support import disc_frames, reference, wait_results
from rrstem.simulators.dectris import SimplonEncoder, Stream2Encoder, stream_detector
from rrstem.simulators.source import ArraySource
from rrstem.stream.detectors import Item, decoder_for
from rrstem.stream.detectors.codecs import compress, decompress
from rrstem.stream.detectors.dectris import SimplonDecoder
from rrstem.stream.detectors.stream2 import Stream2Decoder
from rrstem.stream.protocol import Start
from rrstem.stream.results import read_scan
from rrstem.stream.service import Service, ServiceConfig

NY, NX = 4, 5


def scan(seed=0, dtype=np.uint16, **cal):
    frames = disc_frames(NY, NX, seed=seed, dtype=dtype)
    start = Start(scan_id="dectris-scan", scan_shape=(NY, NX), frame_shape=(32, 32), dtype=np.dtype(dtype).name,
                  calibration=cal)
    return frames, ArraySource(frames, start)


def assert_maps_equal_reference(res, frames):
    ref = reference(frames, res["attrs"]["geometry"], res.get("pixel_mask"))
    assert res["maps"]["filled"].all()
    for name in ("vbf", "vadf"):  # integer counts sum exactly
        np.testing.assert_array_equal(res["maps"][name], ref[name])
    scale = res["attrs"]["calibration"].get("detector_pixel_mrad") or 1.0
    for name in ("com_x", "com_y"):  # binned pixels -> mrad when calibrated (bin 1 here)
        np.testing.assert_allclose(res["maps"][name], scale * ref[name], rtol=0, atol=1e-9 + 1e-6 * np.abs(ref[name]).max())


@pytest.mark.parametrize("protocol, compression, detail", [
    ("simplon", "none", "basic"), ("simplon", "lz4", "all"), ("simplon", "bslz4", "none"),
    ("stream2", "none", None), ("stream2", "lz4", None), ("stream2", "bslz4", None),
])
def test_series_streamed_as_a_detector_gives_the_numpy_maps(make_service, protocol, compression, detail):
    frames, source = scan(energy_kev=200.0, detector_pixel_mrad=0.25)
    svc = make_service(protocol=protocol, scan_shape=(NY, NX))
    order = np.random.default_rng(1).permutation(NY * NX)  # image numbers, not arrival order, place frames
    stats = stream_detector(source, svc.listen_endpoint, bind=False, protocol=protocol, compression=compression,
                            header_detail=detail or "basic", series=7, order=order, progress=False)
    assert stats.frames == NY * NX
    res = read_scan(wait_results(svc))
    assert res["attrs"]["counters"] == {"received": 20, "missing": 0, "duplicate": 0, "invalid": 0, "stale": 0,
                                        "dropped": 0}
    # legacy streams name the series by number; stream2 carries the scan id as the series' unique id
    assert res["scan_id"] == ("series-7" if protocol == "simplon" else "dectris-scan")
    cal = res["attrs"]["calibration"]
    if detail == "none":  # header detail none: no detector config, so no calibration; shape/dtype from images
        assert cal["energy_kev"] is None and cal["detector_pixel_mrad"] is None
    else:
        assert cal["energy_kev"] == pytest.approx(200.0) and cal["detector_pixel_mrad"] == pytest.approx(0.25)
        assert res["units"]["com_x"] == "mrad"
    assert_maps_equal_reference(res, frames)


def test_big_endian_and_uint32_frames_are_converted(make_service):
    frames, source = scan(seed=3, dtype=np.uint32)
    svc = make_service(protocol="simplon", scan_shape=(NY, NX))
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(svc.listen_endpoint)
    enc = SimplonEncoder(source.start, series=2)
    sock.send_multipart(enc.header())
    for i, frame in enumerate(frames.reshape(-1, 32, 32)):
        parts = enc.image(i, frame)
        parts[1] = json.dumps({**json.loads(parts[1]), "encoding": ">"}).encode()
        parts[2] = frame.astype(">u4").tobytes()
        sock.send_multipart(parts)
    sock.send_multipart(enc.end())
    res = read_scan(wait_results(svc))
    sock.close()
    assert res["attrs"]["counters"]["received"] == 20 and res["attrs"]["frame_shape"].tolist() == [32, 32]
    assert_maps_equal_reference(res, frames)


def _raw(svc):
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(svc.listen_endpoint)
    return sock


def test_malformed_legacy_messages_are_counted(make_service):
    frames, source = scan(seed=4, detector_pixel_mrad=0.5)
    flat = frames.reshape(-1, 32, 32)
    svc = make_service(protocol="simplon", scan_shape=(NY, NX))
    sock = _raw(svc)
    enc = SimplonEncoder(source.start, series=3, compression="bslz4")
    good = [enc.image(i, flat[i]) for i in range(20)]
    sock.send_multipart([b"{not json"])  # undecodable
    sock.send_multipart([b'{"htype": "dfoo-1.0"}'])  # unknown message
    sock.send_multipart(good[0])  # image before its series header
    sock.send_multipart([b'{"htype": "dheader-1.0", "series": 3, "header_detail": "basic"}'])  # config part missing
    sock.send_multipart(enc.header())
    for i in range(20):
        sock.send_multipart(good[i])
    corrupt = list(good[5])
    corrupt[2] = corrupt[2][:12] + bytes(len(corrupt[2]) - 12)  # sizes of zero: blocks do not fill the data
    sock.send_multipart(corrupt)
    small = SimplonEncoder(source.start.model_copy(update={"frame_shape": (16, 16)}), series=3).image(6, flat[6, :16, :16])
    sock.send_multipart(small)  # another frame shape than the header's
    sock.send_multipart(good[7][:2])  # no data part
    truncated = list(SimplonEncoder(source.start, series=3).image(8, flat[8]))
    truncated[2] = truncated[2][:-2]
    sock.send_multipart(truncated)  # dimage_d size says 2 bytes more
    sock.send_multipart(enc.end())
    res = read_scan(wait_results(svc))
    sock.close()
    assert res["attrs"]["invalid_reasons"] == {"bad_compression": 1, "bad_shape": 1, "missing_part": 1, "bad_size": 1}
    assert res["attrs"]["counters"]["received"] == 20 and res["attrs"]["counters"]["invalid"] == 4
    assert svc.orphans["undecodable"] == 1 and svc.orphans["unknown_message"] == 1
    assert svc.orphans["no_start"] == 1 and svc.orphans["missing_part"] == 1
    assert_maps_equal_reference(res, frames)


def test_malformed_stream2_messages_are_counted(make_service):
    frames, source = scan(seed=5)
    flat = frames.reshape(-1, 32, 32)
    svc = make_service(protocol="stream2", scan_shape=(NY, NX))
    sock = _raw(svc)
    enc = Stream2Encoder(source.start, series=4, compression="lz4")
    sock.send(b"\xff\xff not cbor")  # undecodable
    sock.send(cbor2.dumps([1, 2]))  # not a map
    sock.send(cbor2.dumps({"type": "status", "series_id": 4}))  # unknown message
    sock.send_multipart(enc.header() + [b"extra"])  # stream2 messages are one part
    sock.send_multipart(enc.header())
    for i in range(20):
        sock.send_multipart(enc.image(i, flat[i]))
    msg = cbor2.loads(enc.image(3, flat[3])[0])
    dims, typed = msg["data"]["threshold_1"].value
    sock.send(cbor2.dumps({**msg, "data": {"threshold_1": cbor2.CBORTag(40, [dims, cbor2.CBORTag(71, b"")])}}))
    alg, mod, packed = typed.value.value
    wrong = cbor2.CBORTag(40, [dims, cbor2.CBORTag(69, cbor2.CBORTag(56500, [alg, mod, packed[:-5]]))])
    sock.send(cbor2.dumps({**msg, "data": {"threshold_1": wrong}}))  # truncated LZ4 block
    sock.send(cbor2.dumps({**msg, "data": {}}))  # no data
    sock.send_multipart(enc.end())
    res = read_scan(wait_results(svc))
    sock.close()
    assert res["attrs"]["invalid_reasons"] == {"bad_dtype": 1, "bad_compression": 1, "bad_data": 1}
    assert res["attrs"]["counters"]["received"] == 20 and res["attrs"]["counters"]["invalid"] == 3
    assert svc.orphans["undecodable"] == 2 and svc.orphans["unknown_message"] == 1 and svc.orphans["extra_part"] == 1
    assert_maps_equal_reference(res, frames)


@pytest.mark.parametrize("decoder, encoder", [(SimplonDecoder, SimplonEncoder), (Stream2Decoder, Stream2Encoder)])
def test_decode_never_raises_on_damaged_messages(decoder, encoder):
    frames, source = scan(seed=6)
    rng = np.random.default_rng(0)
    messages = []
    for compression in ("none", "lz4", "bslz4"):
        enc = encoder(source.start, compression=compression, header_detail="all")
        messages += [enc.header(), enc.image(0, frames[0, 0]), enc.end()]
    seen = set()
    for _ in range(400):
        parts = [bytearray(p) for p in messages[rng.integers(len(messages))]]
        k = rng.integers(len(parts))
        if rng.random() < 0.5:
            parts[k] = parts[k][:rng.integers(len(parts[k]) + 1)]  # truncated
        else:
            for j in rng.integers(0, max(1, len(parts[k])), size=3):  # bytes overwritten
                if parts[k]:
                    parts[k][j] = rng.integers(256)
        dec = decoder((NY, NX))
        dec.decode([zmq.Frame(p) for p in enc.header()])
        out = dec.decode([zmq.Frame(bytes(p)) for p in parts])
        for item in out if isinstance(out, list) else [out]:
            assert isinstance(item, Item) and item.kind in ("start", "frames", "end", "bad")
            assert item.kind != "bad" or item.reason
            if item.kind == "frames":
                assert item.frames.shape == (1, 32, 32)
            seen.add(item.reason or item.kind)
    assert {"bad_compression", "undecodable"} <= seen  # the damage was caught, not just survived


@pytest.mark.parametrize("algorithm", ["lz4-block", "lz4", "bslz4"])
def test_compression_round_trip_and_size_check(algorithm):
    frame = disc_frames(1, 1, 17, 19, dtype=np.uint32)[0, 0]  # 323 pixels: partial blocks and leftovers
    packed = compress(frame, algorithm)
    out = np.frombuffer(decompress(packed, algorithm, 4, frame.nbytes), "<u4").reshape(frame.shape)
    np.testing.assert_array_equal(out, frame)
    with pytest.raises(ValueError, match="expected 1296"):
        decompress(packed, algorithm, 4, frame.nbytes + 4)


def test_a_detector_protocol_without_scan_shape_is_refused_clearly():
    for protocol in ("simplon", "stream2"):
        with pytest.raises(ValueError, match=f"{protocol} protocol does not carry the scan shape: pass it with "
                                             r"--scan-shape NYxNX"):
            decoder_for(protocol, None)
    with pytest.raises(ValueError, match="--scan-shape"):
        Service(ServiceConfig(protocol="stream2", listen="tcp://127.0.0.1:0", bind=True, publish=None,
                              control=None, out=None, train=False))


def test_cli_replays_a_file_as_stream2(make_service, tmp_path, capsys):
    from rrstem.cli import main

    frames, _ = scan(seed=8)
    np.save(tmp_path / "scan.npy", frames)
    svc = make_service(protocol="stream2", scan_shape=(NY, NX))
    argv = ["replay", str(tmp_path / "scan.npy"), "--to", svc.listen_endpoint, "--connect", "--no-progress"]
    assert main(argv + ["--protocol", "stream2", "--compression", "bslz4"]) == 0
    res = read_scan(wait_results(svc))
    assert res["attrs"]["counters"]["received"] == 20
    assert_maps_equal_reference(res, frames)
    assert main(argv + ["--compression", "lz4"]) == 1
    assert "--compression applies to --protocol simplon or stream2, not rrstem" in capsys.readouterr().err


def test_legacy_encoding_strings_follow_the_simplon_grammar():
    """``[bs<BITS>][[-]lz4](<|>)``: the dash is optional; bitshuffle without LZ4 is refused, not read as raw."""
    frames, source = scan(seed=9)
    frame = frames[0, 0]
    dec = SimplonDecoder((NY, NX))
    enc = SimplonEncoder(source.start, series=1, compression="bslz4")
    dec.decode([zmq.Frame(p) for p in enc.header()])
    for encoding, blob, want in (("bs16lz4<", compress(frame, "bslz4"), "frames"),
                                 ("bs16<", frame.tobytes(), "unsupported_compression"),
                                 ("lz4>", compress(frame.astype(">u2"), "lz4-block"), "frames")):
        parts = enc.image(0, frame)
        parts[1] = json.dumps({**json.loads(parts[1]), "encoding": encoding, "size": len(blob)}).encode()
        parts[2] = blob
        (item,) = dec.decode([zmq.Frame(p) for p in parts])
        assert (item.kind if item.kind == "frames" else item.reason) == want, (encoding, item.detail)
        if item.kind == "frames":
            np.testing.assert_array_equal(item.frames[0], frame)


def test_a_legacy_header_sent_part_by_part_starts_the_series():
    """LiberTEM's DECTRIS simulators send dheader-1.0 and each following part as its own message."""
    frames, source = scan(seed=10, energy_kev=300.0, detector_pixel_mrad=0.4)
    enc = SimplonEncoder(source.start, series=6, header_detail="all")
    dec = SimplonDecoder((NY, NX))
    header = enc.header()
    assert len(header) == 8
    for part in header[:-1]:
        assert dec.decode([zmq.Frame(part)]) == []  # waiting for the rest
    (start,) = dec.decode([zmq.Frame(header[-1])])
    assert start.kind == "start" and start.message.frame_shape == (32, 32)
    assert start.message.calibration.energy_kev == pytest.approx(300.0)
    (item,) = dec.decode([zmq.Frame(p) for p in enc.image(3, frames[0, 3])])
    assert item.kind == "frames" and item.message.first == 3
    # a header cut short by the next message is counted, and the message still decoded
    dec.decode([zmq.Frame(header[0])])
    bad, start2 = dec.decode([zmq.Frame(p) for p in SimplonEncoder(source.start, series=7).header()])
    assert (bad.kind, bad.reason, start2.message.scan_id) == ("bad", "missing_part", "series-7")


def test_a_zero_bslz4_header_means_the_frame_size_and_the_default_block():
    """LiberTEM-rs' mock DCU leaves the 12-byte header zero (its decoder skips it); any other mismatch is bad."""
    frame = disc_frames(1, 1, 40, 52, dtype=np.uint16)[0, 0]
    packed = compress(frame, "bslz4")
    zeroed = bytes(12) + packed[12:]
    out = np.frombuffer(decompress(zeroed, "bslz4", 2, frame.nbytes), "<u2").reshape(frame.shape)
    np.testing.assert_array_equal(out, frame)
    with pytest.raises(ValueError, match="holds 0 bytes"):
        decompress(zeroed, "lz4", 2, frame.nbytes)  # only bslz4 (no block size to guess for lz4)
