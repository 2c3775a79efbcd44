"""Notes without tokens: MIDI parsing into note tables, the prepared JSON and shard formats, reading any piece,
score time, and rendering (WAV, piano roll)."""
