"""`python -m effcifar` is the `effcifar` command (torchrun needs the module form)."""

import sys

from effcifar.cli import main

sys.exit(main())
