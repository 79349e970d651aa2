"""Merlin ``.mib`` files, written byte by byte from the format: read lazily, replayed, analyzed; damage named."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from support import disc_frames, reference, wait_results
from rrstem.cli import main
from rrstem.simulators.files import open_file
from rrstem.simulators.merlin import MerlinFormat, acquisition_order, write_mib
from rrstem.simulators.formats.mib import MibSource
from rrstem.simulators.source import stream
from rrstem.stream.preprocess import PreprocessConfig
from rrstem.stream.results import read_scan
from rrstem.stream.service import Service, ServiceConfig

NY, NX = 4, 5


def frames_of(dtype=np.uint16, seed=0):
    return disc_frames(NY, NX, seed=seed, dtype=dtype, level=100.0 if dtype == np.uint8 else 1000.0)


def assert_maps(res, frames, filled=None):
    ref = reference(frames, res["attrs"]["geometry"], res.get("pixel_mask"), filled=filled)
    where = slice(None) if filled is None else filled
    np.testing.assert_array_equal(res["maps"]["filled"], np.ones((NY, NX), bool) if filled is None else filled)
    for name in ("vbf", "vadf"):
        np.testing.assert_array_equal(res["maps"][name][where], ref[name][where])
    for name in ("com_x", "com_y"):
        np.testing.assert_allclose(res["maps"][name][where], ref[name][where], rtol=0,
                                   atol=1e-9 + 1e-6 * np.abs(ref[name]).max())


def analyze(path, *extra):
    out = path.with_suffix(".rrstem.h5")
    code = main(["analyze", str(path), "--no-train", "--no-progress", "--calibration-frames", "8", "--out", str(out),
                 *extra])
    return code, out


def test_the_records_follow_the_format_byte_by_byte(tmp_path):
    frame = np.arange(6, dtype=np.uint16).reshape(2, 3) * 257
    path = write_mib(tmp_path / "tiny.mib", frame[None], scan_xy=(1, 1))
    raw = path.read_bytes()
    assert len(raw) == 384 + 12
    assert raw.startswith(b"MQ1,000001,00384,01,0003,0002,U16,   1x1,01,")
    assert raw[:384].rstrip(b"\x00").endswith(b",MQ1A,2026-01-01T12:00:00.001000000Z,1000000ns,12,")
    assert raw[384:] == b"".join(int(v).to_bytes(2, "big") for v in frame.ravel())
    hdr = path.with_suffix(".hdr").read_bytes().decode("latin-1")
    assert hdr.startswith("HDR,\t\n") and "\nFrames in Acquisition (Number):\t1\n" in hdr
    assert "\nScanX:\t1\nScanY:\t1\nEnd\t" in hdr
    quad = MerlinFormat((512, 512), "uint32", "2x2").frame_header(7)
    assert quad.startswith(b"MQ1,000007,00768,04,0512,0512,U32,   2x2,0F,") and len(quad) == 768


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
@pytest.mark.parametrize("layout", ["1x1", "2x2"])
def test_a_mib_file_analyzes_to_the_numpy_maps(tmp_path, dtype, layout):
    frames = frames_of(dtype)
    path = write_mib(tmp_path / "scan.mib", frames.reshape(-1, 32, 32), layout=layout, scan_xy=(NX, NY))
    with open_file(path) as src:
        assert isinstance(src, MibSource) and src.start.scan_shape == (NY, NX) and src.start.dtype == np.dtype(dtype).name
        np.testing.assert_array_equal(src.chunk(3, 6), frames.reshape(-1, 32, 32)[3:9])
        assert src.chunk(0, 2).dtype == np.dtype(dtype).newbyteorder("=")
        assert src.start.metadata["frame_header"]["layout"] == layout
    code, out = analyze(path)
    assert code == 0
    res = read_scan(out)
    assert res["attrs"]["counters"]["received"] == 20 and res["attrs"]["complete"]
    assert_maps(res, frames)


def test_a_mib_without_hdr_takes_the_scan_shape_and_says_so_when_missing(tmp_path, capsys):
    frames = frames_of(seed=1)
    path = write_mib(tmp_path / "flat.mib", frames.reshape(-1, 32, 32), hdr=False)
    with pytest.raises(ValueError, match=r"flat.mib: the scan shape is unknown \(it has no .hdr file \(flat.hdr\), and no "
                                         r"pauses in its frame times mark scan lines\); it holds 20 frames: pass it with --scan-shape NYxNX"):
        open_file(path)
    assert analyze(path)[0] == 2
    assert "pass it with --scan-shape" in capsys.readouterr().err
    code, out = analyze(path, "--scan-shape", f"{NY}x{NX}")
    assert code == 0
    assert_maps(read_scan(out), frames)


def test_the_hdr_opens_its_mib(tmp_path):
    frames = frames_of(seed=2)
    path = write_mib(tmp_path / "acq.mib", frames.reshape(-1, 32, 32), scan_xy=(NX, NY))
    with open_file(path.with_suffix(".hdr")) as src:
        assert src.path == path and src.n_frames == 20
        np.testing.assert_array_equal(src.chunk(19, 1)[0], frames[-1, -1])


def test_a_truncated_mib_streams_the_frames_before_the_damage_and_names_the_file(tmp_path, capsys):
    frames = frames_of(seed=3)
    path = write_mib(tmp_path / "cut.mib", frames.reshape(-1, 32, 32), scan_xy=(NX, NY))
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size - 1000)  # the last frame loses its end
    record = 384 + 32 * 32 * 2
    with open_file(path) as src:
        assert src.n_frames == 20 and src.available_frames == 19
        assert src.problem == (f"cut.mib is damaged: 1 of its 20 frames skipped (frame 19 at offset {19 * record}: "
                               f"truncated); the other 19 frames are read")
        assert src.start.metadata["skipped_frames"] == [
            {"frame": 19, "offset": 19 * record, "reason": f"truncated: the file ends {record - 1000} bytes into its "
                                                          f"record of {record} bytes"}]
    code, out = analyze(path)
    assert code == 1
    assert "cut.mib is damaged" in capsys.readouterr().err
    res = read_scan(out)
    assert res["attrs"]["counters"]["received"] == 19 and res["attrs"]["counters"]["missing"] == 1
    filled = np.ones((NY, NX), bool)
    filled[-1, -1] = False
    assert_maps(res, frames, filled)


def test_a_frame_header_that_disagrees_costs_that_frame_only(tmp_path):
    frames = frames_of(seed=4)
    path = write_mib(tmp_path / "odd.mib", frames.reshape(-1, 32, 32), scan_xy=(NX, NY))
    raw = bytearray(path.read_bytes())
    record = 384 + 32 * 32 * 2
    at = 7 * record + raw[7 * record:].index(b"U16")
    raw[at:at + 3] = b"U08"  # frame 7 says U08 (was: every frame from 7 on was refused)
    path.write_bytes(bytes(raw))
    with open_file(path) as src:
        np.testing.assert_array_equal(src.chunk(0, 7), frames.reshape(-1, 32, 32)[:7])
        np.testing.assert_array_equal(src.chunk(8, 12), frames.reshape(-1, 32, 32)[8:])
        assert [s.as_dict() for s in src.skipped] == [
            {"frame": 7, "offset": 7 * record, "reason": "its frame header is damaged (disagrees with the "
                                                         "acquisition's)"}]
        with pytest.raises(ValueError, match=r"frames 4..11 of odd.mib cannot be read: frames \[7\] are damaged"):
            src.chunk(4, 8)


def test_not_a_mib_is_refused_clearly(tmp_path):
    path = tmp_path / "junk.mib"
    path.write_bytes(b"MQ1,xyz" + bytes(100))
    with pytest.raises(ValueError, match="junk.mib is not a Merlin .mib file"):
        open_file(path)


def test_a_raw_r64_mib_is_refused_by_name_and_says_what_to_set(tmp_path):
    path = write_mib(tmp_path / "raw.mib", frames_of(seed=7).reshape(-1, 32, 32), hdr=False)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"U16", b"R64"))  # what the Merlin writes with raw output on
    with pytest.raises(ValueError, match=r"raw\.mib is a Merlin \.mib that rrstem cannot read: pixel type 'R64'.*"
                                         r"counter depth of 1, 6, 12 or 24 bits"):
        open_file(path)


def test_a_damaged_hdr_is_named(tmp_path):
    path = write_mib(tmp_path / "scan.mib", frames_of(seed=8).reshape(-1, 32, 32), hdr=True)
    hdr = path.with_suffix(".hdr")
    hdr.write_bytes(hdr.read_bytes().replace(b"End", b"Xnd"))
    with pytest.raises(ValueError, match=r"scan\.hdr \(the \.hdr of scan\.mib\) cannot be read: .*no End line"):
        open_file(path)


def test_analyze_places_a_misaligned_acquisition(tmp_path):
    frames = frames_of(seed=5)
    order = acquisition_order((NY, NX), 3, 2)
    path = write_mib(tmp_path / "misaligned.mib", frames.reshape(-1, 32, 32)[order], hdr=False)
    code, out = analyze(path, "--scan-shape", f"{NY}x{NX}", "--sync-offset", "3", "--flyback", "2")
    assert code == 0
    res = read_scan(out)
    assert res["attrs"]["invalid_reasons"] == {"sync_offset": 3, "flyback": 8}
    assert_maps(res, frames)


def test_replay_of_a_mib_over_rrstem_1(tmp_path):
    frames = frames_of(np.uint32, seed=6)
    path = write_mib(tmp_path / "r.mib", frames.reshape(-1, 32, 32), layout="2x2", scan_xy=(NX, NY))
    cfg = ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish=None, control=None, out=tmp_path / "res.h5",
                        train=False, preprocess=PreprocessConfig(calibration_frames=8))
    with Service(cfg).start() as svc, open_file(path) as src:
        stream(src, svc.listen_endpoint, bind=False, progress=False)
        res = read_scan(wait_results(svc))
    assert res["attrs"]["dtype"] == "uint32"
    assert_maps(res, frames)


def test_replay_sends_a_misaligned_acquisition_whole_and_serve_places_it(tmp_path):
    """Replay is the detector: the sync-offset and flyback frames go out too, the receiver's options place them
    (analyze refuses them without --sync-offset/--flyback, replay must not)."""
    frames = frames_of(seed=9)
    order = acquisition_order((NY, NX), 3, 2)
    path = write_mib(tmp_path / "acq.mib", frames.reshape(-1, 32, 32)[order], scan_xy=(NX, NY))
    cfg = ServiceConfig(listen="tcp://127.0.0.1:0", bind=True, publish=None, control=None, out=tmp_path / "res.h5",
                        train=False, sync_offset=3, flyback=2, preprocess=PreprocessConfig(calibration_frames=8))
    with Service(cfg).start() as svc, open_file(path, extra_ok=True) as src:
        assert src.n_frames == len(order) == NY * (NX + 2) + 3
        stream(src, svc.listen_endpoint, bind=False, progress=False)
        res = read_scan(wait_results(svc))
    assert res["attrs"]["invalid_reasons"] == {"sync_offset": 3, "flyback": 8}
    assert res["attrs"]["complete"]
    assert_maps(res, frames)
    with pytest.raises(ValueError, match=r"holds 31 frames, more than the 4x5 scan takes"):
        open_file(path)


def test_cli_replays_a_mib_as_a_merlin_pc(tmp_path):
    frames = frames_of(seed=7)
    path = write_mib(tmp_path / "pc.mib", frames.reshape(-1, 32, 32), scan_xy=(NX, NY))
    proc = subprocess.Popen([sys.executable, "-m", "rrstem.cli", "replay", str(path), "--protocol", "merlin",
                             "--to", "tcp://127.0.0.1:0", "--no-progress"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # "rrstem replay: bound tcp://127.0.0.1:PORT; scan ..."
        endpoint = line.split("bound ")[1].split(";")[0]
        cfg = ServiceConfig(listen=endpoint, protocol="merlin", publish=None, control=None, out=tmp_path / "res.h5",
                            train=False, preprocess=PreprocessConfig(calibration_frames=8))
        with Service(cfg).start() as svc:
            res = read_scan(wait_results(svc))
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.stderr.close()
    assert res["attrs"]["counters"]["received"] == 20
    assert_maps(res, frames)


def test_a_mib_without_scanx_scany_is_read_by_its_lines(tmp_path):
    """A .hdr without ScanX/ScanY: its frames per trigger (a line-triggered scan) give the line; analyzed as
    NY x NX with no --scan-shape, maps equal NumPy's."""
    frames = frames_of(seed=11)
    path = write_mib(tmp_path / "lines.mib", frames.reshape(-1, 32, 32), frames_per_trigger=NX)
    assert "ScanX" not in path.with_suffix(".hdr").read_text(errors="replace")
    with open_file(path) as src:
        assert tuple(src.start.scan_shape) == (NY, NX)
    code, out = analyze(path)
    assert code == 0
    assert_maps(read_scan(out), frames)


def test_scan_lines_from_frames_per_trigger_and_pauses():
    from rrstem.simulators.formats.mib import scan_lines

    even = np.arange(12) * 1e-3  # 1 ms frames, no pause: no line structure
    assert scan_lines(12, 1, even) == (None, "")
    assert scan_lines(12, 4, even)[0] == (3, 4)  # 4 frames per trigger
    assert scan_lines(1, 1, even[:1])[0] == (1, 1)
    paused = even + np.repeat([0, 21e-6, 42e-6], 4)  # a 21 us pause before frames 4 and 8 (a real Merlin's)
    assert scan_lines(12, 1, paused) == ((3, 4), "a pause in its frame times every 4 frames")
    jitter = even + np.array([0, 2, -1, 1, 0, -2, 1, 0, 2, -1, 0, 1]) * 1e-6  # microsecond jitter is no pause
    assert scan_lines(12, 1, jitter) == (None, "")
    irregular = even + np.r_[0, 0, 0, 30e-6 * np.ones(9)]  # one pause before frame 3 only: not every 3 frames
    assert scan_lines(12, 1, irregular) == (None, "")
