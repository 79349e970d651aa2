"""Make this folder's helper module (``feeder``) importable from its tests; train on one torch thread.

The trainer's thread runs torch on ``TrainerConfig.threads`` (1) threads; tests that drive the
synchronous core from the test's own thread do the same, so they do not compete for the cores.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
