"""Issue 8's speed paths, checked on the CPU against the reference paths they must agree with: the decode loop
on the device (tokens), the one-token static step (logits), the fused no-sync training step (losses, skipped
steps), deferred read-back of step results (metrics bit for bit) and compilation (loss, checkpoint keys)."""

import copy
import functools

import numpy as np
import pytest
import torch
from reference_loop import reference_loop

import midiforge.generate.decode as decode_mod
from midiforge.data.sampler import IGNORE_INDEX
from midiforge.generate.core import prompt_ids
from midiforge.generate.decode import decode
from midiforge.generate.steer import Steering
from midiforge.model import ModelConfig, Transformer, run_block
from midiforge.tokens.onsetgrid import OnsetGrid
from midiforge.tokens.tokenizer import MidiTokenizer
from midiforge.train import accel
from midiforge.train import distributed as dist
from midiforge.train.loop import Loop, SavePolicy, fit
from midiforge.train.trainer import Trainer, TrainState

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> MidiTokenizer:
    return MidiTokenizer()


def eos_prone_model(tok, max_seq_len=64) -> Transformer:
    """An untrained model whose EOS logit is large in some contexts, so that rows stop at different steps."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(tok), n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=max_seq_len)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        model.tok_emb.weight[tok.eos_id] *= 60
    return model


def both_loops(
    model, tok, *, prompt=None, B=3, n=120, max_seconds=None, kv=True, ignore_eos=False, steer=None,
    controls=None, fast=decode, beat=0.0, **s,
):  # fmt: skip
    banned = [tok.pad_id, tok.bos_id] + ([tok.eos_id] if ignore_eos else [])
    out = []
    for loop in (reference_loop, fast):
        g = torch.Generator().manual_seed(7)
        st = None if steer is None else Steering.build(tok, controls, steer, None, beat_strength=beat)
        head = prompt_ids(tok, prompt) if st is None else st.head(prompt_ids(tok, prompt))
        with torch.inference_mode():
            ids, stop = loop(model, tok, head, B, n, max_seconds, kv, banned, dict(s, generator=g), "cpu", st)
        out.append((ids, stop))
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(top_k=20, temperature=0.9),
        dict(top_p=0.9, max_seconds=3.0, n=200),
        dict(kv=False, B=2, n=60),
        dict(ignore_eos=True, B=2, n=150),  # past the 64-token window: the context slides
        dict(prompt=[10, 20, 30, 40], steer=15, n=90),  # steer: no EOS before 15 new tokens
        # Requests and the onset grid: state masks on the device, and the control prefix kept when it slides.
        dict(
            steer=0,
            n=150,
            B=2,
            ignore_eos=True,
            controls={"instruments": "piano,violin", "tempo": 90, "key": "D minor", "time_sig": "3/4"},
        ),
        dict(steer=0, n=100, B=2, ignore_eos=True, controls={"key": "A minor"}, beat=1.5),  # logit biases
    ],
)
def test_decode_gives_the_reference_tokens(tok, kw):
    counts = np.zeros((13, 12), np.int64)
    counts[:, [0, 3, 6]] = 5
    tok.onset_grid = OnsetGrid(12, counts)  # the grid mask runs in every case
    try:
        (ref, ref_stop), (fast, fast_stop) = both_loops(eos_prone_model(tok), tok, **kw)
    finally:
        tok.onset_grid = None
    assert fast_stop == ref_stop
    assert torch.equal(fast[:, : ref.size(1)], ref)
    # The fast loop looks at EOS only every SYNC_EVERY tokens: what it ran past the end is PAD.
    assert (fast[:, ref.size(1) :] == tok.pad_id).all()


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_k=20, temperature=0.9),
        dict(top_p=0.9, max_seconds=3.0, n=200),
        dict(ignore_eos=True, B=2, n=150),  # the window slides: the kept tokens are prefilled again
        dict(prompt=[10, 20, 30, 40], steer=15, n=90),
        # the control prefix is prefilled again in front of a slid context
        dict(
            steer=0, n=150, B=2, ignore_eos=True, controls={"tempo": 90, "key": "D minor", "time_sig": "3/4"}
        ),
    ],
)
def test_the_captured_token_step_gives_the_reference_tokens(tok, kw):
    """The step that CUDA captures as one graph (fixed-shape forward, mask, sample, PAD, buffer write, done
    flags; positions and counters as device data), run uncaptured here: the reference loop's tokens."""
    fast = functools.partial(decode, static=True)
    (ref, ref_stop), (got, got_stop) = both_loops(eos_prone_model(tok), tok, fast=fast, **kw)
    assert got_stop == ref_stop
    assert torch.equal(got[:, : ref.size(1)], ref)
    assert (got[:, ref.size(1) :] == tok.pad_id).all()


@pytest.mark.slow
def test_the_compiled_token_step_gives_the_reference_tokens(tok, monkeypatch):
    """The same step through torch.compile (one block traced for every layer, and the sampling tail)."""
    monkeypatch.setattr(decode_mod, "COMPILE_BACKEND", "aot_eager")  # inductor would take minutes here
    torch._dynamo.reset()
    fast = functools.partial(decode, static=True, compile=True)
    (ref, _), (got, _) = both_loops(
        eos_prone_model(tok), tok, fast=fast, ignore_eos=True, B=2, n=80, top_k=20
    )
    assert torch.equal(got, ref)


def test_bf16_weights_give_the_fp32_tokens_where_the_margin_exceeds_rounding(tok):
    """Greedy decoding with bf16 weights follows fp32 at every step where fp32's lead of the best token over
    the second exceeds twice bf16's largest logit error (there rounding cannot change the choice)."""
    model = eos_prone_model(tok)
    half = copy.deepcopy(model).cast(torch.bfloat16)
    assert half.rope_cos.dtype == torch.float32 and half.new_kv_cache(1, 8).k.dtype == torch.bfloat16
    banned = [tok.pad_id, tok.bos_id, tok.eos_id]
    ids = []
    for m in (model, half):
        with torch.inference_mode():
            got, _ = decode(
                m, tok, [tok.bos_id], 2, 48, None, True, banned, dict(top_k=1), "cpu", static=True
            )
        ids.append(got)
    with torch.no_grad():
        full, low = model(ids[0])[:, :-1].float(), half(ids[0])[:, :-1].float()  # (B, T, V) along fp32's path
    full[..., banned], low[..., banned] = float("-inf"), float("-inf")
    assert (low - full).nan_to_num(posinf=0, neginf=0).norm() / full.nan_to_num(neginf=0).norm() < 2e-2
    err = (low - full).nan_to_num(posinf=0, neginf=0).abs().amax(-1)  # (B, T)
    top2 = full.topk(2, dim=-1).values
    safe = (top2[..., 0] - top2[..., 1] > 2 * err).all(0)  # (T,): steps whose choice bf16 cannot flip
    first_unsafe = int(safe.logical_not().nonzero()[0]) if not safe.all() else safe.numel()
    assert first_unsafe >= 8  # the comparison below says something
    assert torch.equal(ids[1][:, : first_unsafe + 1], ids[0][:, : first_unsafe + 1])


def test_eos_prone_model_stops_rows_at_different_steps(tok):
    (ref, stop), _ = both_loops(eos_prone_model(tok), tok, B=4, n=200)
    assert stop.count("eos") >= 2  # the cases above really exercise per-row EOS stops
    ends = {int((row == tok.eos_id).nonzero()[0]) for row in ref if (row == tok.eos_id).any()}
    assert len(ends) >= 2


def test_static_step_matches_the_cached_forward(tok):
    model = eos_prone_model(tok)
    prompt = torch.randint(3, len(tok), (2, 9), generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(3, len(tok), (2, 1), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = model.new_kv_cache(2, 32), model.new_kv_cache(2, 32)
        model(prompt, a)
        model(prompt, b)
        want = model(nxt, a, last_only=True)[:, -1].float()
        got = model.static_step(nxt, torch.tensor(b.pos), b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.k[:, :, :, :10], a.k[:, :, :, :10])


# --- training ----------------------------------------------------------------------------------------------
def tiny_trainer(fused: bool, compile: bool = False, lr: float = 1e-2) -> Trainer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=64, dropout=0.0)
    t = Trainer(Transformer(cfg), torch.device("cpu"), dist.DistInfo(), learning_rate=lr, weight_decay=0.01,
                fused=fused, compile=compile)  # fmt: skip
    t.set_schedule(0, 20)
    return t


def batches(shapes=((3, 17), (2, 40), (4, 9), (3, 33), (1, 20), (2, 25))):
    g = torch.Generator().manual_seed(1)
    out = []
    for b, t in shapes:
        x = torch.randint(0, 64, (b, t), generator=g)
        y = torch.roll(x, -1, 1)
        y[0, t // 2 :] = IGNORE_INDEX  # right padding in one row
        out.append((x, y))
    return out


def test_fused_step_matches_the_reference_step():
    ref, fused = tiny_trainer(False), tiny_trainer(True)
    for x, y in batches():
        n = float((y != IGNORE_INDEX).sum())
        (la, sa), (lb, sb) = ref.train_step(x, y, n), fused.train_step(x, y, n)
        assert sa == sb == "ok"
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    for p, q in zip(ref.raw.parameters(), fused.raw.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("what", ["grad", "loss"])
def test_fused_step_skips_a_non_finite_step_without_asking_the_host(what):
    t = tiny_trainer(True)
    x, y = batches()[0]
    t.train_step(x, y, 10.0)
    before = [p.detach().clone() for p in t.raw.parameters()]
    steps = [s["step"].item() for s in t.optimizer.state.values()]
    param = t.raw.blocks[0].mlp.up.weight
    if what == "grad":  # finite loss, infinite gradient
        h = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    else:  # NaN weights: NaN loss and gradients
        with torch.no_grad():
            param[0, 0] = float("nan")
        before = [p.detach().clone() for p in t.raw.parameters()]
    loss, code = t.train_step_async(x, y, 10.0)
    assert code.device.type == "cpu" and code.dtype == torch.float64
    assert accel.status_of(float(code), 1) == "bad"
    assert torch.isfinite(loss) == (what == "grad")
    for p, q in zip(before, t.raw.parameters(), strict=True):
        assert (
            torch.equal(
                p,
                q,
            )
            or (p.isnan() == q.isnan()).all()
            and torch.equal(p.nan_to_num(), q.nan_to_num())
        )
    assert [s["step"].item() for s in t.optimizer.state.values()] == steps  # the kernel undid its count
    if what == "grad":
        h.remove()


class _Sampler:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def set_epoch(self, e):
        pass


def run_fit(every: int, fused: bool, poison_steps=(), max_steps=None):
    """Two epochs of fit over fixed batches; the model outputs NaN at ``poison_steps`` (0-based, global)."""
    t = tiny_trainer(fused, lr=3e-3)
    data = batches()
    calls = {"n": 0}

    def poison(module, args, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] - 1 in poison_steps else out

    t.raw.head.register_forward_hook(poison)
    saves, state, metrics = [], TrainState(), {"epochs": [], "steps": []}
    loop = Loop(
        trainer=t, state=state, metrics=metrics, sampler=_Sampler(len(data)),
        make_loader=lambda e: iter(data[state.batch :]), val_loader=None,
        save=lambda: saves.append((state.step, state.bad, state.loss_sum)), end_of_epoch=lambda: None,
        policy=SavePolicy(1e9, max_steps), num_epochs=2, where="mem", readback_every=every,
    )  # fmt: skip
    fit(loop)
    for row in metrics["epochs"]:
        row.pop("seconds")
    return metrics, state.state_dict() | {"seconds": 0}, saves


@pytest.mark.parametrize("fused", [False, True])
def test_deferred_readback_counts_exactly_as_reading_every_step(fused):
    a = run_fit(1, fused, poison_steps=(2, 3, 8))
    assert a[0]["steps"] and a[1]["step"] == 12 and len(a[2]) == 2
    for every in (4, 5):
        assert run_fit(every, fused, poison_steps=(2, 3, 8)) == a
    # --max-steps in the middle of an epoch: the pending steps are read back before the stop's save
    stopped = run_fit(5, fused, max_steps=9)
    assert stopped[1]["step"] == 9 and stopped[2][-1][0] == 9
    assert stopped == run_fit(1, fused, max_steps=9)


# --- compilation -------------------------------------------------------------------------------------------
def test_compile_switch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not accel.compile_enabled("auto", cpu) and accel.compile_enabled("auto", cuda)
    assert accel.compile_enabled("on", cpu) and not accel.compile_enabled("off", cuda)
    with pytest.raises(ValueError):
        accel.compile_enabled("yes", cpu)


@pytest.mark.slow
def test_compiled_loss_matches_eager_and_checkpoints_cross_load(monkeypatch):
    monkeypatch.setattr(accel, "COMPILE_BACKEND", "aot_eager")  # inductor on a 2-core CPU takes minutes
    torch._dynamo.reset()
    eager, comp = tiny_trainer(False), tiny_trainer(False, compile=True)
    assert comp.model is not comp.raw
    for x, y in batches()[:4]:
        n = float((y != IGNORE_INDEX).sum())
        (la, _), (lb, _) = eager.train_step(x, y, n), comp.train_step(x, y, n)
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    sd = comp.state_dict()
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in sd["model"])
    assert all(k.startswith("module.") for k in comp.model.state_dict())  # the wrapper would have
    # A compiled run's checkpoint goes on uncompiled, and the other way round, with the same next loss.
    fresh_eager, fresh_comp = tiny_trainer(False), tiny_trainer(False, compile=True)
    fresh_eager.load_state_dict(sd)
    fresh_comp.load_state_dict(eager.state_dict())
    x, y = batches()[4]
    n = float((y != IGNORE_INDEX).sum())
    la, _ = fresh_eager.train_step(x, y, n)
    lb, _ = fresh_comp.train_step(x, y, n)
    lc, _ = comp.train_step(x, y, n)
    torch.testing.assert_close(la, lc, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lb, la, rtol=1e-3, atol=1e-3)


def test_regional_compilation_traces_one_block_for_every_layer():
    """One graph for all four layers and for a second batch shape: compile time does not grow with depth."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=4, n_head=2, d_model=32, d_ff=64, max_seq_len=64)
    model = Transformer(cfg)
    wrapped = accel.RegionalCompiled(model)
    wrapped.block_fn = torch.compile(run_block, dynamic=True, backend=counting)
    for shape in ((2, 16), (3, 24)):
        x = torch.randint(0, 64, shape)
        got, want = wrapped(x), model(x)
        torch.testing.assert_close(got, want)
        got.sum().backward()
    assert len(graphs) == 1
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("fused", [False, True])
def test_loss_scaler_skip_is_told_apart_from_a_bad_step(fused):
    """fp16 bookkeeping (CPU GradScaler stands in for CUDA's): an overflowing gradient with a finite loss is a
    scaler skip, the scale halves and nothing is applied; the device-side code agrees with the host's answer."""
    t = tiny_trainer(fused)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = batches()[0]
    assert t.train_step(x, y, 10.0)[1] == "ok"
    before = [p.detach().clone() for p in t.raw.parameters()]
    h = t.raw.blocks[0].mlp.up.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    loss, code = t.train_step_async(x, y, 10.0)
    h.remove()
    assert accel.status_of(float(code), 1) == "scaler_skip" and torch.isfinite(loss)
    assert t.scaler.get_scale() == 2.0**15
    assert all(torch.equal(p, q) for p, q in zip(before, t.raw.parameters(), strict=True))
    assert t.train_step(x, y, 10.0)[1] == "ok"
