"""midiforge: train Transformer models on MIDI collections and generate music with them."""

__version__ = "0.1.0"

__all__ = ["MidiTokenizer", "generate", "__version__"]


def __getattr__(name):
    # Lazy so that `import midiforge` stays cheap (no torch) for prepare and the tokenizer.
    if name == "MidiTokenizer":
        from midiforge.tokenizer import MidiTokenizer

        return MidiTokenizer
    if name == "generate":
        from midiforge.generate import generate

        return generate
    raise AttributeError(name)
