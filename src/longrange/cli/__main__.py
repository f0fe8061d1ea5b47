"""``python -m longrange.cli``: the ``longrange`` command."""

import sys

from longrange.cli import main

sys.exit(main())
