"""midiforge: train Transformer models on your own MIDI collection, then make music with them.

The library's front doors: :class:`midiforge.tokens.MidiTokenizer` (notes to tokens and back, also importable as
``from midiforge import MidiTokenizer``) and :func:`midiforge.generate.generate` (a model and a prompt to
pieces); the command line is ``midiforge``.
"""

from midiforge.version import __version__

__all__ = ["MidiTokenizer", "__version__"]


def __getattr__(name):
    # Lazy, so that `import midiforge` stays cheap and the package's root imports none of its layers.
    if name == "MidiTokenizer":
        from midiforge.tokens.tokenizer import MidiTokenizer

        return MidiTokenizer
    raise AttributeError(name)
