"""Train a model: `python train.py NUM_EPOCHS CKPT_PATH -t TRAIN_DIR [-v VAL_DIR] ...` (same as `midiforge train`)."""

import os
import sys

# Works from a plain checkout too (no `pip install -e .` needed).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

if __name__ == "__main__":
    from midiforge.train.command import main

    sys.exit(main())
