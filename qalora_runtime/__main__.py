"""`python -m qalora_runtime` is the `qalora` command."""

import sys

from .cli import main

sys.exit(main())
