"""tests/cli: its helper modules (``_killed_runs``) importable from the
wings' test folders (tests/cli/image, tests/cli/lm) as from here."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
