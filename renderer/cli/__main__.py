"""`python -m renderer.cli`: the `freescale-render` command."""

import sys

from renderer.cli import main

sys.exit(main())
