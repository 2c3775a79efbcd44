"""Our LoRA layer (midiforge.lora): exact gradients, peft's arithmetic and checkpoint names, and no more
activation-sized tensors per adapted projection than the frozen ``nn.Linear`` alone (tiny models, no files).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from midiforge import lora
from midiforge.model import ModelConfig, Transformer

CFG = dict(vocab_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=32)


def _peft():
    try:
        import peft
    except ImportError:
        if os.environ.get("CI", "").strip().lower() == "true":
            pytest.fail("peft is not installed and CI=true: the comparison must run in CI", pytrace=False)
        pytest.skip("peft is not installed (pip install 'midiforge[dev]')")
    return peft


def _model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**CFG))


def test_lora_function_gives_exact_gradients():
    g = torch.Generator().manual_seed(0)
    x, w, a, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((6, 5), (7, 5), (3, 5), (7, 3)))
    for t in (x, w, a, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *t: lora.LoraFunction.apply(*t, 1.7), (x, w, a, b))


def test_attach_freezes_the_base_and_merge_folds_the_adapter_in():
    model = lora.attach(_model(), 4, 8.0, ["qkv", "down"])
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trains and all(".lora_A." in n or ".lora_B." in n for n in trains)
    assert len(trains) == 2 * 2 * CFG["n_layer"]  # A and B on two projections per block
    for name, t in lora.adapter_state(model).items():  # B starts at zero: the model starts as the base
        if ".lora_B." in name:
            assert not t.any()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    x = torch.randint(0, CFG["vocab_size"], (2, 20))  # (B, T)
    with torch.no_grad():
        adapted = model(x)
        merged = lora.merge(model)(x)
    assert not any(isinstance(m, lora.LoraLinear) for m in model.modules())
    assert torch.allclose(adapted, merged, atol=1e-5)
    with pytest.raises(ValueError, match="no projection"):
        lora.attach(_model(), 4, 8.0, ["nothing"])


def test_lora_equals_peft_and_loads_its_adapters():
    """The same adapters through peft (midiforge's first LoRA) and through our layer: the same logits, the same
    gradients; peft's adapter names are ours, so LoRA checkpoints written through peft still load."""
    peft = _peft()
    theirs, ours = _model(), _model()
    config = peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=list(lora.TARGETS), lora_dropout=0.0)
    peft.inject_adapter_in_model(config, theirs)
    lora.attach(ours, 4, 8.0, lora.TARGETS)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    saved = {k: v.clone() for k, v in peft.get_peft_model_state_dict(theirs).items()}
    lora.load_adapter(ours, saved)
    assert lora.adapter_state(ours).keys() == saved.keys()
    x = torch.randint(0, CFG["vocab_size"], (2, 20))  # (B, T)
    y_theirs, y_ours = theirs(x), ours(x)
    assert torch.allclose(y_theirs, y_ours, atol=1e-6)
    (y_theirs.square().mean()).backward()
    (y_ours.square().mean()).backward()
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    want = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    for n in got:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4), n
    with pytest.raises(KeyError):
        lora.load_adapter(ours, {k: v for k, v in saved.items() if ".qkv." not in k})


class _Allocations(TorchDispatchMode):
    """The element counts of the new tensors each aten op returns (not views, not in-place results)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (
                isinstance(t, torch.Tensor)
                and not t._is_view()
                and t.untyped_storage().data_ptr() not in seen
            ):
                self.sizes.append(t.numel())
        return out


def _activation_sized(layer: nn.Module, n=256, d_in=64, d_out=96) -> int:
    """New tensors of at least n * min(d_in, d_out) elements made by one forward and backward pass."""
    x = torch.randn(n, d_in, requires_grad=True)  # (N, i)
    with _Allocations() as seen:
        layer(x).sum().backward()
    return sum(size >= n * min(d_in, d_out) for size in seen.sizes)


def test_an_adapted_projection_allocates_no_more_activations_than_the_frozen_linear():
    """What kept LoRA from saving memory with peft's layer: base(x) + B(A(x)) * scale allocates three more
    activation-sized tensors forward and two more backward, per projection; ours allocates what the frozen
    layer allocates (its output forward, the input's gradient backward)."""
    torch.manual_seed(0)
    frozen = nn.Linear(64, 96, bias=False).requires_grad_(False)
    plain = _activation_sized(frozen)
    assert plain == 2
    wrapped = lora.attach(nn.Sequential(nn.Linear(64, 96, bias=False)), 8, 16.0, ["0"])
    assert _activation_sized(wrapped) == plain


def test_a_head_adapter_trains_alone_and_merges_into_an_untied_head():
    """The head is tied to the embedding: its adapter changes the output side only. Training moves the
    adapter and nothing of the base (the embedding included); merging gives the head weights of its own
    (config.tie_head False) and leaves the embedding as it was, with the adapted model's logits."""
    model = _model()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    lora.attach(model, 4, 8.0, ["head"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "head.lora_A.weight",
        "head.lora_B.weight",
    }
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, CFG["vocab_size"], (2, 20))  # (B, T)
    for _ in range(3):
        opt.zero_grad()
        logits = model(x[:, :-1])  # (B, T-1, V)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
    state = model.state_dict()
    for name, t in before.items():  # the base, bit-identical: the embedding (and tied head weight) too
        assert torch.equal(state[name.replace("head.weight", "head.base_layer.weight")], t), name
    assert lora.adapter_state(model)["head.lora_B.weight"].any()
    with torch.no_grad():
        adapted = model(x)
        lora.merge(model)
        merged = model(x)
    assert model.config.tie_head is False and model.head.weight is not model.tok_emb.weight
    assert torch.equal(model.tok_emb.weight, before["tok_emb.weight"])  # the input side as it was
    assert not torch.equal(model.head.weight, before["tok_emb.weight"])
    assert torch.allclose(adapted, merged, atol=1e-5)
    # a merged model is saved and loaded as a plain one: its config says the head is its own
    assert model.config.to_dict()["tie_head"] is False and "tie_head" not in _model().config.to_dict()
    again = Transformer(ModelConfig.from_dict(model.config.to_dict()))
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), merged)


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_default_rank_8_adapters_are_at_most_3_percent_of_the_model(preset):
    """Counted on the real models, at the bench's vocabulary (1,024) and train's default (2,048)."""
    from midiforge.model import PRESETS
    from midiforge.train.config import DEFAULT_VOCAB

    for vocab in (1024, DEFAULT_VOCAB):
        model = Transformer(ModelConfig(vocab_size=vocab, **PRESETS[preset]))
        total = sum(p.numel() for p in model.parameters())
        lora.attach(model, 8, 16.0, lora.DEFAULT_TARGETS)
        assert lora.trainable_parameters(model) <= 0.03 * total, (preset, vocab)


def test_lora_plus_gives_the_b_matrices_their_own_learning_rate():
    """LoRA+: the Trainer puts every B matrix (and nothing else) in a group at ``b_lr_ratio`` x the rate, through
    warmup and decay; at ratio 1 the optimizer has the two groups it always had (older checkpoints resume)."""
    from midiforge.train.distributed import DistInfo
    from midiforge.train.trainer import Trainer

    def trainer(ratio):
        model = lora.attach(_model(), 4, 8.0, ["qkv", "head"])
        t = Trainer(model, torch.device("cpu"), DistInfo(), learning_rate=1e-3, weight_decay=0.01,
                    adapters_only=True, b_lr_ratio=ratio)  # fmt: skip
        t.set_schedule(0, 10)
        return model, t

    assert len(trainer(1.0)[1].optimizer.param_groups) == 2
    model, t = trainer(16.0)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = t.optimizer.param_groups
    grouped = [sorted(names[id(p)] for p in g["params"]) for g in groups]
    assert grouped[2] == sorted(n for n in names.values() if ".lora_B." in n) and len(grouped[2]) == 3
    assert all(".lora_A." in n for n in grouped[0] + grouped[1])
    x = torch.randint(0, CFG["vocab_size"], (2, 16))  # (B, T)
    for _ in range(4):  # through warmup into the decay
        assert groups[2]["lr"] == pytest.approx(16 * groups[0]["lr"]) and groups[0]["lr"] > 0
        t.train_step(x, torch.roll(x, -1, 1), float(x.numel()))
