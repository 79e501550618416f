"""``python -m jstep``: see `jstep.cli`."""

import sys

from jstep.cli import main

if __name__ == "__main__":
    sys.exit(main())
