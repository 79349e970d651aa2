"""``python -m rrstem.gui --connect EP ...``: the same as ``rrstem dashboard``."""

import sys

from rrstem.gui.app import main

sys.exit(main())
