"""Every test runs Qt offscreen: CI and these machines have no display."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
