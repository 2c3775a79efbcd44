"""The studio: a local web page over `midiforge generate` (a standard-library server, a job queue, static files)."""
