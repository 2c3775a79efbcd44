"""Making music with a trained model: sampling, the decode loop, steering, editing inside a piece, the command."""

from midiforge.generate.core import Generation, generate

__all__ = ["Generation", "generate"]
