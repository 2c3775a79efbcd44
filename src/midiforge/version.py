"""The package version (recorded in every tokenizer.json, so that a file says which midiforge wrote it)."""

__version__ = "0.1.0"
