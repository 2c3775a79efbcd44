"""From a folder of music to training batches: prepare, the token cache and dataset, the Σ len² sampler, the
training-example rearrangements (infilling, control prefixes, style tags), crash-isolated workers, the demo corpus."""
