"""Training: the typed run config (the CLI), setup, the trainer step, the loop, distributed and speed switches,
exact-resume RNG state, curves (PNG, TensorBoard). The command is :mod:`midiforge.train.command`."""
