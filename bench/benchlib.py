"""What bench_train.py and bench_generate.py share: the FLOP formula, the card's peak, peak memory, and the
Hugging Face Llama of our shape (transformers is a bench-only extra: `pip install -e '.[bench]'`)."""

from __future__ import annotations

import platform
import resource

import torch

FLOP_FORMULA = "6·N + 12·L·C·T per trained token, 2·N + 4·L·C·T per generated token (N: matmul params)"


def flops_per_token(config, context: int, *, training: bool) -> float:
    """Matmul FLOPs per token (PaLM, appendix B): N = parameters in matmuls (blocks + the tied head, not the
    embedding lookup); the attention term uses the attended context T (the mean window for training)."""
    C, L, F, V = config.d_model, config.n_layer, config.d_ff, config.vocab_size
    n = L * (4 * C * C + 3 * C * F) + V * C
    per = 6 if training else 2
    return per * n + 2 * per * L * C * context


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a known CUDA card; None elsewhere (then report achieved FLOP/s, not MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H200", 989), ("H100", 989), ("A100", 312), ("L40S", 362), ("4090", 165)):
        if key in name:
            return tflops * 1e12
    return None


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    """CUDA: the peak allocated since reset_peak. CPU: the process's peak RSS so far (not per row)."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"(RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)"


def rate(flops: float, seconds: float, device: torch.device) -> str:
    """MFU when the card's peak is known, else achieved FLOP/s."""
    peak = peak_flops(device)
    achieved = flops / max(seconds, 1e-9)
    return f"{achieved / peak:.1%} MFU" if peak else f"{achieved / 1e9:.2f} GFLOP/s"


def hf_llama(config, device: torch.device, dtype=None):
    """LlamaForCausalLM of our shape: same layers, width, heads (no GQA), SwiGLU width, RoPE base, RMSNorm eps,
    tied embeddings, SDPA attention; None when transformers is not installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    from midiforge.export import llama_shape

    cfg = LlamaConfig(
        **llama_shape(config), attn_implementation="sdpa", bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


class HFLogits(torch.nn.Module):
    """The HF model as our Trainer expects a model: ids (B, T) -> logits (B, T, V)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, idx):
        return self.hf(input_ids=idx, use_cache=False).logits
