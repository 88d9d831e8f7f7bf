"""``python -m gmem``: the same as the ``gmem`` command."""

import sys

from gmem.cli import main

sys.exit(main())
