"""The package maps the top-level folders into one ``rrstem`` namespace, in a wheel as in the checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_rrstem_namespace_and_imports(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("rrstem-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"rrstem"}  # no generic "stream", "model", "tests" in site-packages
    for module in ("rrstem/__init__.py", "rrstem/cli.py", "rrstem/stream/service.py", "rrstem/model/rrvae.py",
                   "rrstem/gui/window.py", "rrstem/simulators/graphene.py"):
        assert module in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "rrstem = rrstem.cli:main" in entry
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = ("import rrstem, rrstem.cli, rrstem.model.trainer, rrstem.gui, rrstem.simulators.graphene;"
            "print(rrstem.__file__); print(rrstem.cli.__file__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert all(line.startswith(str(unpacked)) for line in run.stdout.split())
