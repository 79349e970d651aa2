"""``--trainer JSON``: trainer and model options on the command line of serve, analyze and demo."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from support import disc_frames

from rrstem.cli import build_parser
from rrstem.stream.cli import trainer_overrides
from rrstem.stream.results import read_scan


def test_the_option_parses_to_trainer_overrides():
    args = build_parser().parse_args(["serve", "--trainer", '{"seed": 3, "lr": 0.001}', "--latent-dim", "4"])
    assert trainer_overrides(args) == {"seed": 3, "lr": 0.001, "latent_dim": 4}  # the named options win
    args = build_parser().parse_args(["serve", "--trainer", '{"latent_dim": 5}', "--latent-dim", "4"])
    assert trainer_overrides(args) == {"latent_dim": 4}
    assert trainer_overrides(build_parser().parse_args(["serve"])) == {}


@pytest.mark.parametrize("text, says", [("{seed: 1}", "not JSON"), ("[1, 2]", "must be a JSON object")])
def test_bad_json_is_refused_with_a_message(capsys, text, says):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--trainer", text])
    assert says in capsys.readouterr().err


def test_the_options_reach_the_trainer(tmp_path):
    """A real ``rrstem analyze``: the seed and consolidation given as JSON are the ones the results record."""
    np.save(tmp_path / "scan.npy", disc_frames(8, 8))
    proc = subprocess.run([sys.executable, "-m", "rrstem.cli", "analyze", str(tmp_path / "scan.npy"), "--no-progress",
                           "--trainer", '{"seed": 7, "consolidate_seconds": 0.5, "min_frames": 16}'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    trainer = read_scan(tmp_path / "scan.rrstem.h5")["model"]["config"]["trainer"]
    assert (trainer["seed"], trainer["consolidate_seconds"], trainer["min_frames"]) == (7, 0.5, 16)
