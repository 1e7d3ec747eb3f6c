"""Times batched products and softmaxes of the attention's shapes through PyTorch on a GPU, as a
yardstick for glimpse's own (`bench --device cuda`'s profile): 64 heads, 2048 queries and keys,
q k widths 256 (and 768, the split-bf16 form's three terms), values 256. Ran once on an H200
(docs/gpu-results.md, run 2). Prints one line per product: milliseconds (mean of 10 after a
warm-up) and TFLOP/s.

    python3 scripts/attention-probe.py
"""
import time

import torch
import torch.nn.functional as F

torch.backends.cuda.matmul.allow_tf32 = False


def bench(f, n=10):
    f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


h, s = 64, 2048
for name, dt, kk in [("f32 scores k256", torch.float32, 256), ("bf16 scores k256", torch.bfloat16, 256),
                     ("bf16 scores k768", torch.bfloat16, 768)]:
    q = torch.randn(h, s, kk, device="cuda", dtype=dt)
    k = torch.randn(h, kk, s, device="cuda", dtype=dt)
    ms = bench(lambda: torch.bmm(q, k))
    print(f"{name}: {ms:.3f} ms, {2 * h * s * s * kk / ms / 1e9:.1f} TFLOP/s")
    try:
        ms = bench(lambda: torch.bmm(q, k, out_dtype=torch.float32))
        print(f"{name} out f32: {ms:.3f} ms, {2 * h * s * s * kk / ms / 1e9:.1f} TFLOP/s")
    except Exception as e:  # a torch without out_dtype
        print("out_dtype:", e)
for name, dt, kk in [("f32 PV t2048", torch.float32, 2048), ("bf16 PV t2048", torch.bfloat16, 2048),
                     ("bf16 PV t6144", torch.bfloat16, 6144)]:
    p = torch.randn(h, s, kk, device="cuda", dtype=dt)
    v = torch.randn(h, kk, 256, device="cuda", dtype=dt)
    ms = bench(lambda: torch.bmm(p, v))
    print(f"{name}: {ms:.3f} ms, {2 * h * s * kk * 256 / ms / 1e9:.1f} TFLOP/s")
x = torch.randn(h, s, s, device="cuda")
print(f"softmax f32 64x2048x2048: {bench(lambda: torch.softmax(x, -1)):.3f} ms")
q = torch.randn(1, h, s, 256, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, h, s, 256, device="cuda", dtype=torch.bfloat16)
print(f"sdpa bf16 causal 64 heads 2048 d256: {bench(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True)):.3f} ms")
