"""``python -m control_plane.cli``: the same as the ``edgectl`` script."""

import sys

from control_plane.cli import main

sys.exit(main())
