"""The README's command lines, run as written, in the pairs the README implies.

The lines are read from README.md's code blocks (every line that starts with
``rrstem`` or ``.venv/bin/rrstem``), never copied here, and run as real
processes (``python -m rrstem.cli ...``) in a temporary working directory, so
the README's relative file names (scan.h5, session.h5, ...) land there; the
input files are made under the names and keys the lines give. Pairs:

- every ``serve`` line with each sender line (``replay``, ``simulate``) that
  names its frames endpoint; a ``serve`` line whose endpoint is a detector's
  (DETECTOR:PORT, a DECTRIS DCU) with a stand-in detector, ``rrstem simulate``
  in the line's protocol, which binds as the detector does;
- the ``dashboard`` line beside a ``serve``;
- ``analyze``, then ``analyze --model`` with the model the first wrote;
- the ``demo`` line.

Endpoints: the side that binds the frames endpoint binds port 0 itself and
reports the port; the other side is given the reported endpoint. ``serve``
publishes on port 0 (instead of the fixed 5556/5557) and the dashboard is
given the endpoint serve reports. Options are only ever appended to a README
line (argparse keeps the last of a repeated option), each with its reason
where it is appended, to make the runs small and finite.

Not run: ``./setup.sh`` (it installs), ``python -m pytest`` (this suite) and
``bench/`` (benchmarks, not tests): none of them starts with ``rrstem``.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from support import disc_frames
from rrstem.cli import build_parser
from rrstem.stream.results import read_scan

README = Path(__file__).resolve().parents[1] / "README.md"
RRSTEM = [sys.executable, "-m", "rrstem.cli"]
SENDERS = ("replay", "simulate")
ANY_PORT = "tcp://127.0.0.1:0"
#: appended to every serve line: free ports instead of the fixed 5556/5557 (tests run side by side),
#: and no rrVAE, which a scan of a few frames does not need
SERVE_OPTIONS = ["--publish", ANY_PORT, "--control", ANY_PORT, "--events", ANY_PORT, "--steering", ANY_PORT,
                 "--no-train"]
#: appended to simulate lines: a small scan (8x8 positions of 64x64 px) instead of 128x128 of 256x256
SMALL_SCAN = ["--scan", "8x8", "--detector", "64"]


def readme_lines() -> list[list[str]]:
    """The argv (after ``rrstem``) of every rrstem line in the README's code blocks, comments stripped."""
    lines, in_code = [], False
    for text in README.read_text().splitlines():
        if text.startswith("```"):
            in_code = not in_code
        elif in_code and text.split() and Path(text.split()[0]).name == "rrstem":
            lines.append(shlex.split(text, comments=True)[1:])
    return lines


LINES = readme_lines()
PARSER = build_parser()


def parse(argv: list[str]):
    return PARSER.parse_args(argv)


def lines_of(command: str) -> list[list[str]]:
    return [argv for argv in LINES if argv[0] == command]


def frames_endpoint(argv: list[str]) -> str:
    args = parse(argv)
    return args.listen if args.command == "serve" else args.to


def binds(argv: list[str]) -> bool:
    args = parse(argv)
    return args.bind if args.command == "serve" else not args.connect


def serve_pairs() -> list[tuple[list[str], list[str] | None]]:
    """(serve line, sender line) for each README sender naming the serve's endpoint; None: a detector's."""
    pairs = []
    for serve in lines_of("serve"):
        senders = [s for c in SENDERS for s in lines_of(c) if frames_endpoint(s) == frames_endpoint(serve)]
        pairs += [(serve, s) for s in senders] or [(serve, None)]
    return pairs


def pair_id(pair) -> str:
    serve, sender = pair
    return f"{shlex.join(serve[:3])} + {sender[0] if sender else 'stand-in detector'}"


def substitute(argv: list[str], old: str, new: str) -> list[str]:
    assert old in argv, f"{old!r} not in {argv}"
    return [new if word == old else word for word in argv]


class Process:
    """A command-line process whose stdout and stderr lines are collected as they come."""

    def __init__(self, argv: list[str], cwd: Path):
        self.argv = argv
        self.popen = subprocess.Popen([*RRSTEM, *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)  # text: tqdm's "\r" ends a line too
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.readers = [threading.Thread(target=self._read, args=(f,), daemon=True)
                        for f in (self.popen.stdout, self.popen.stderr)]
        for t in self.readers:
            t.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    @property
    def output(self) -> str:
        with self.changed:
            return f"$ rrstem {shlex.join(self.argv)}\n" + "".join(self.lines)

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """The first output line matching ``pattern``, waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    if m := re.search(pattern, line):
                        return m
                left = deadline - time.monotonic()
                ended = self.popen.poll() is not None and not any(t.is_alive() for t in self.readers)
                assert left > 0 and not ended, f"no line matching {pattern!r}:\n{''.join(self.lines)}"
                self.changed.wait(min(left, 0.5))

    def finish(self, timeout: float = 60.0) -> int:
        """Wait for the exit (killing it after ``timeout`` s) and for its last output; the exit code."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.output}") from None
        for t in self.readers:
            t.join(10)
        return code


@pytest.fixture
def run(tmp_path):
    """``run(argv)`` starts ``rrstem argv`` in tmp_path; whatever is left running is killed at the end."""
    started = []

    def start(argv: list[str]) -> Process:
        started.append(Process(argv, tmp_path))
        return started[-1]

    yield start
    for p in started:
        if p.popen.poll() is None:
            p.popen.kill()
            p.popen.wait(10)


def scan_of(path: Path, positions: int) -> dict:
    """The one scan of a results file; all its positions were received."""
    res = read_scan(path)
    counters = res["attrs"]["counters"]
    assert counters["received"] == positions and counters["missing"] == 0, counters
    return res


# --- the lines themselves -------------------------------------------------------------------------


def test_the_readme_shows_every_command_and_each_line_parses():
    assert {argv[0] for argv in LINES} == {"demo", "serve", "dashboard", "replay", "simulate", "analyze", "events",
                                           "rescan"}
    assert all(parse(argv).func for argv in LINES)  # the one parser takes every line as written


def test_of_each_pair_of_lines_exactly_one_binds_the_frames_endpoint():
    pairs = serve_pairs()
    for serve, sender in pairs:
        if sender is None:
            assert not binds(serve), f"{shlex.join(serve)}: a detector binds, so serve must connect"
        else:
            assert binds(serve) != binds(sender), f"{shlex.join(serve)} and {shlex.join(sender)}"
    paired = [sender for _, sender in pairs]
    assert all(s in paired for c in SENDERS for s in lines_of(c)), "a sender line that goes with no serve line"


def test_the_dashboard_line_connects_to_what_serve_publishes():
    published = {parse(serve).publish for serve in lines_of("serve")}
    assert published == {parse(dash).connect for dash in lines_of("dashboard")}


# --- run as written -------------------------------------------------------------------------------


@pytest.mark.parametrize("serve, sender", serve_pairs(), ids=[pair_id(p) for p in serve_pairs()])
def test_serve_writes_the_scan_its_sender_sends(serve, sender, run, tmp_path):
    # serve runs until stopped: --once (appended) makes it exit after the first scan's results are written
    serve = serve + SERVE_OPTIONS + ["--once"]
    if sender is None:  # a detector's endpoint: a stand-in detector speaking the line's protocol binds it
        sender = ["simulate", "--to", frames_endpoint(serve), "--protocol", parse(serve).protocol]
        if parse(serve).scan_shape is not None:
            serve = serve + ["--scan-shape", "8x8"]  # appended: the stand-in's scan (SMALL_SCAN), not the line's
    if parse(sender).steer:  # appended: obey rescans for 1 s after the scan, not a minute (none will come)
        sender = sender + ["--steer-idle", "1"]
    if sender[0] == "simulate":
        sender, positions = sender + SMALL_SCAN, 64
    else:  # replay: a small recorded scan, under the file name and key the line gives
        args = parse(sender)
        frames = disc_frames(6, 5, seed=3)
        with h5py.File(tmp_path / args.input, "w") as f:
            f.create_dataset(args.key, data=frames)
        positions = 30
    if binds(serve):
        server = run(substitute(serve, frames_endpoint(serve), ANY_PORT))
        endpoint = server.expect(r"frames from (\S+),").group(1)
        client = run(substitute(sender, frames_endpoint(sender), endpoint))
    else:
        client = run(substitute(sender, frames_endpoint(sender), ANY_PORT))
        endpoint = client.expect(r"bound (\S+);").group(1)
        server = run(substitute(serve, frames_endpoint(serve), endpoint))
    assert client.finish() == 0, client.output
    assert server.finish() == 0, server.output
    res = scan_of(tmp_path / parse(serve).out, positions)
    assert f"results of scan {res['scan_id']}" in server.output


def test_the_dashboard_draws_what_serve_publishes(run):
    serve = next(s for s in lines_of("serve") if binds(s))  # a serve that needs no detector
    server = run(substitute(serve, frames_endpoint(serve), ANY_PORT) + SERVE_OPTIONS)
    published = server.expect(r"snapshots on (\S+),").group(1)
    for dash in lines_of("dashboard"):
        # appended: render offscreen (tests have no display) and close after 3 s (the dashboard's smoke-test flag)
        dashboard = run(substitute(dash, parse(dash).connect, published) + ["--offscreen", "--exit-after", "3"])
        assert dashboard.finish() == 0, dashboard.output
        drawn = int(dashboard.expect(r"dashboard: (\d+) snapshots drawn").group(1))
        assert drawn >= 1, dashboard.output  # serve publishes a heartbeat snapshot every second, even idle
    server.popen.send_signal(signal.SIGINT)  # Ctrl-C: serve stops cleanly
    assert server.finish() == 0, server.output


def scaled_out(argv: list[str]) -> bool:
    args = parse(argv)
    return args.cluster is not None or args.workers is not None


def test_analyze_on_dask_lines_show_both_ways_and_are_accepted():
    from rrstem.scaleout import check_options

    lines = [parse(a) for a in lines_of("analyze") if scaled_out(a)]
    assert sorted((a.workers is not None, a.cluster is not None) for a in lines) == [(False, True), (True, False)]
    for args in lines:
        check_options(args)  # what they run (tests/test_scaleout.py runs both ways) is accepted


def test_analyze_then_analyze_with_the_model_it_trained(run, tmp_path):
    first, second = [a for a in lines_of("analyze") if not scaled_out(a)]
    assert parse(second).model == parse(first).out  # the second line encodes with the first line's model
    for i, line in enumerate((first, second)):
        np.save(tmp_path / parse(line).input, disc_frames(8, 8, seed=20 + i))
    # appended: consolidate the rrVAE for 1 s after the scan, not for up to a minute
    trainer = run(first + ["--consolidate", "1"])
    assert trainer.finish(120) == 0, trainer.output
    trained = scan_of(tmp_path / parse(first).out, 64)
    encoder = run(second)
    assert encoder.finish(120) == 0, encoder.output
    out = parse(second).out or parse(second).input.with_suffix(".rrstem.h5")  # analyze's default --out
    encoded = scan_of(tmp_path / out, 64)
    assert encoded["model"]["config"]["source"] == str(parse(second).model)
    assert encoded["model"]["state"].keys() == trained["model"]["state"].keys()
    for name, weights in trained["model"]["state"].items():
        np.testing.assert_array_equal(encoded["model"]["state"][name], weights)
    latent = encoded["maps"]["latent"]
    assert latent.shape[1:] == (8, 8) and np.isfinite(latent).all()


@pytest.mark.parametrize("demo", lines_of("demo"), ids=shlex.join)
def test_the_demo_lines(demo, run, tmp_path):
    # appended: --headless as the README says for no display (and --out into the temporary folder);
    # a small scan without the rrVAE, sent fast: the full demo trains for about a minute. The steering
    # loop's scan stays 64x64 (its anomaly score needs a few unit cells), of 64 px frames.
    scan = "64" if parse(demo).steer else "8"
    proc = run(demo + ["--headless", "--out", "demo", "--scan", scan, "--detector", "64", "--no-train",
                       "--rate", "5000"])
    assert proc.finish(120) == 0, proc.output
    if not parse(demo).steer:
        scan_of(tmp_path / "demo" / "results.h5", 64)
        return
    with h5py.File(tmp_path / "demo" / "results.h5") as f:  # the scan, and the vacancy's subscan of it
        (sub,) = [g for g in f["scans"].values() if "parent_scan_id" in g.attrs]
        parent = f["scans"][sub.attrs["parent_scan_id"]]
        assert parent["maps/filled"][()].sum() == 64 * 64 and sub["maps/filled"][()].all()
        assert sub.attrs["step_factor"] == 0.5 and sub.attrs["dose_factor"] == 4.0
    assert (tmp_path / "demo" / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_own_maps_example_runs_as_written(tmp_path):
    """The README's reduction module ("Your own maps"), saved as my_maps.py and given to analyze."""
    text = README.read_text()
    section = text[text.index("## Your own maps"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    (tmp_path / "my_maps.py").write_text(code)
    np.save(tmp_path / "scan.npy", disc_frames(5, 6, seed=8))
    run = subprocess.run([*RRSTEM, "analyze", "scan.npy", "--no-train", "--no-progress", "--calibration-frames", "8",
                          "--reductions", "my_maps.py", "--out", "r.h5"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    res = read_scan(tmp_path / "r.h5")
    assert res["units"]["annular_1p5_3"] == "counts"
    assert (res["maps"]["annular_1p5_3"] > 0).all()  # every frame has counts in the annulus
