"""`python -m optgen ...` runs the `optgen` command (optgen/cli.py)."""
import sys

from optgen.cli import main

sys.exit(main())
