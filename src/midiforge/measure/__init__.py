"""Measures of a model and its music: held-out likelihood (bits per note), sample statistics, the copy check."""
