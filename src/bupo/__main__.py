"""``python -m bupo``: the ``bupo`` command."""

import sys

from bupo.cli import main

sys.exit(main())
