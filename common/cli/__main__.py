"""`python -m common.cli`: the `hemex` command."""

import sys

from common.cli import main

sys.exit(main())
