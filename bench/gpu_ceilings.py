"""The card's two ceilings, measured (not the datasheet's): a bf16 matrix product on random data and a
device-to-device copy. MFU in the other benches is against the datasheet peak (benchlib.peak_flops); this says
how far that peak is reachable here.

    python3 bench/gpu_ceilings.py
"""

import torch


def timed(fn, reps: int = 10) -> float:
    """Mean seconds per call over ``reps`` calls after three warm-ups, timed with CUDA events."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main() -> None:
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    t = timed(lambda: a @ b)
    print(f"{torch.cuda.get_device_name()}: bf16 {n}x{n}x{n} matmul {2 * n**3 / t / 1e12:.0f} TFLOP/s")
    src = torch.randn(2**30, device="cuda")  # 4 GiB
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src))
    print(f"device-to-device copy {2 * src.numel() * 4 / t / 1e12:.2f} TB/s (bytes read + written)")


if __name__ == "__main__":
    main()
