"""The entry point of the one-file kcore (make dist): the `kcore` command."""

import sys

from kcore.cli import main

sys.exit(main())
