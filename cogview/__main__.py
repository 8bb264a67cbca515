"""python -m cogview <command> [key=value ...]: the same as the `cogview` command."""

import sys

from cogview.cli import main

sys.exit(main())
