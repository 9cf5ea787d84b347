"""``python -m ltau_lmp.cli``: the same as the ``ltau-lmp`` command."""

import sys

from ltau_lmp.cli import main

sys.exit(main())
