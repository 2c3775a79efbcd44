"""The CUDA paths, run only where there is a GPU (marked ``cuda``; every other test hides the GPU): the token step
captured as one CUDA graph against the same step uncaptured, compiled blocks against eager ones, bf16 weights,
and training with one compiled block for every layer against eager training."""

import functools

import pytest
import torch

from midiforge.data.sampler import IGNORE_INDEX
from midiforge.generate.decode import decode
from midiforge.model import ModelConfig, Transformer, run_block
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.train import distributed as dist
from midiforge.train.trainer import Trainer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def tok() -> MidiTokenizer:
    return MidiTokenizer()


def model_on_cuda(tok, max_seq_len=64, dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(tok), n_layer=2, n_head=2, d_model=64, d_ff=128, max_seq_len=max_seq_len)
    return Transformer(cfg).to(CUDA).eval().cast(dtype)


def run(loop, model, tok, B=3, n=100, **sampling):
    banned = [tok.pad_id, tok.bos_id, tok.eos_id]  # EOS banned: every row runs to n, past the 64-token window
    g = torch.Generator(device=CUDA).manual_seed(3)
    with torch.inference_mode():
        return loop(model, tok, [tok.bos_id], B, n, None, True, banned, dict(sampling, generator=g), CUDA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_captured_step_gives_the_uncaptured_tokens(tok, dtype):
    """One replay per token (forward, masks, sampling, buffer write on the device) = the same step run op by op."""
    model = model_on_cuda(tok, dtype=dtype)
    captured = functools.partial(decode, graph=True, compile=False)
    uncaptured = functools.partial(decode, graph=False, static=True)
    (a, stop_a), (b, stop_b) = run(captured, model, tok, top_k=30), run(uncaptured, model, tok, top_k=30)
    assert stop_a == stop_b
    assert torch.equal(a, b) and a.shape == (3, 101) and not (a[:, 1:] == tok.pad_id).any()


def test_compiled_blocks_give_the_eager_logits_and_a_full_run(tok):
    model = model_on_cuda(tok)
    compiled = torch.compile(run_block, dynamic=False)
    prompt = torch.randint(3, len(tok), (2, 9), device=CUDA, generator=torch.Generator(CUDA).manual_seed(1))
    nxt = torch.randint(3, len(tok), (2, 1), device=CUDA, generator=torch.Generator(CUDA).manual_seed(2))
    with torch.inference_mode():
        a, b = model.new_kv_cache(2, 32), model.new_kv_cache(2, 32)
        model(prompt, a)
        model(prompt, b)
        pos = torch.tensor(a.pos, device=CUDA)
        want = model.static_step(nxt, pos, a)
        got = model.static_step(nxt, pos, b, block_fn=compiled)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    ids, stop = run(functools.partial(decode, graph=True, compile=True), model, tok, B=2, n=80)
    assert ids.shape == (2, 81) and stop == ["", ""] and not (ids[:, 1:] == tok.pad_id).any()


def test_training_with_one_compiled_block_follows_eager_training():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=3, n_head=2, d_model=64, d_ff=128, max_seq_len=64)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (4, 33), generator=g) for _ in range(4)]
    losses = []
    for compile in (False, True):
        torch.manual_seed(0)
        t = Trainer(Transformer(cfg), CUDA, dist.DistInfo(), learning_rate=1e-3, weight_decay=0.01,
                    compile=compile)  # fmt: skip
        t.set_schedule(0, 10)
        out = []
        for b in batches:
            x, y = b[:, :-1].to(CUDA), b[:, 1:].to(CUDA)
            out.append(float(t.train_step(x, y, float((y != IGNORE_INDEX).sum()))[0]))
        losses.append(out)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
