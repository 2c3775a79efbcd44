"""Notes to tokens and back: the event vocabulary, BPE, control prefixes and decoding (knows notes, not files)."""

from midiforge.tokens.tokenizer import MidiTokenizer

__all__ = ["MidiTokenizer"]
