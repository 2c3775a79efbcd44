import math

import pytest
import torch

from midiforge.model import PRESETS, ModelConfig, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=50, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config()).eval()


def test_forward_shapes(model):
    idx = torch.randint(0, 50, (3, 17))
    assert model(idx).shape == (3, 17, 50)
    assert model(idx, last_only=True).shape == (3, 1, 50)


def test_config_round_trip_and_validation():
    cfg = tiny_config(dropout=0.1)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(d_model=30, n_head=4)
    for name in ("tiny", "small", "base", "large"):
        ModelConfig(vocab_size=100, **PRESETS[name])  # every preset is a valid shape


def test_init_is_independent_per_layer_and_scaled():
    torch.manual_seed(0)
    m = Transformer(tiny_config(n_layer=4, d_model=64, d_ff=256))
    w0, w1 = m.blocks[0].attn.qkv.weight, m.blocks[1].attn.qkv.weight
    assert not torch.equal(w0, w1)
    assert abs(w0.std().item() - 0.02) < 0.003
    resid = torch.cat([m.blocks[i].mlp.down.weight.flatten() for i in range(4)])
    assert abs(resid.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert m.head.weight is m.tok_emb.weight
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())
    # state_dict holds learned tensors only (rope tables are derived from the config)
    assert not any("rope" in k for k in m.state_dict())


def test_kv_cache_logits_match_full_forward(model):
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx)
    cache = model.new_kv_cache(batch_size=2)
    with torch.no_grad():
        parts = [model(idx[:, :8], cache)]  # prefill into an empty cache
        parts.append(model(idx[:, 8:13], cache))  # chunk after cached positions (explicit mask path)
        parts += [model(idx[:, t : t + 1], cache) for t in range(13, 20)]  # one token at a time
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)


def test_right_padding_does_not_change_real_positions(model):
    idx = torch.randint(3, 50, (1, 10))
    padded = torch.cat([idx, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded)[:, :10], model(idx), atol=1e-5, rtol=1e-4)


def test_window_limit_raises(model):
    with pytest.raises(ValueError, match="window"):
        model(torch.zeros(1, 65, dtype=torch.long))
    cache = model.new_kv_cache(1, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="window"):
        model(torch.zeros(1, 1, dtype=torch.long), cache)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = Transformer(tiny_config(dropout=0.5))
    idx = torch.randint(0, 50, (1, 8))
    m.train()
    assert not torch.equal(m(idx), m(idx))
    m.eval()
    assert torch.equal(m(idx), m(idx))


def test_trains_one_step():
    torch.manual_seed(0)
    m = Transformer(tiny_config())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    idx = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(5):
        logits = m(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
