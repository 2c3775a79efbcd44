"""A model pushed hard towards some tokens: the tests' way to tempt a decoder into breaking a rule it must keep."""

import torch


class Favouring(torch.nn.Module):
    """``model`` whose logits favour the token ``ids`` by far (+50) at every position."""

    def __init__(self, model, ids):
        super().__init__()
        self.model, self.config, self.ids = model, model.config, list(ids)

    def new_kv_cache(self, *a, **k):
        return self.model.new_kv_cache(*a, **k)

    def forward(self, idx, kv_cache=None, last_only=False):
        logits = self.model(idx, kv_cache, last_only=last_only).clone()
        logits[..., self.ids] += 50.0
        return logits
