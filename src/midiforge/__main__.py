"""``python -m midiforge``: the same command line as the ``midiforge`` script."""

import sys

from midiforge.cli import main

if __name__ == "__main__":
    sys.exit(main())
