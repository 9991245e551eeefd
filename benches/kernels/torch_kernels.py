"""PyTorch (what diffusers runs) on the shapes of benches/kernels/cases.json, CPU f32, one JSON
line per case with the median time in milliseconds. Usage: torch_kernels.py [CASES] [REPEATS]"""
import json
import sys
import time

import torch
import torch.nn.functional as F

torch.set_grad_enabled(False)
cases = json.load(open(sys.argv[1] if len(sys.argv) > 1 else "benches/kernels/cases.json"))
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5


def time_ms(f):
    f()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


for b, i, o, k, s, p, h, w in cases["conv"]:
    x, wt, bias = torch.randn(b, i, h, w), torch.randn(o, i, k, k), torch.randn(o)
    print(json.dumps({"kind": "conv", "case": [b, i, o, k, s, p, h, w],
                      "torch_ms": time_ms(lambda: F.conv2d(x, wt, bias, stride=s, padding=p))}))
for rows, i, o in cases["linear"]:
    x, wt, bias = torch.randn(rows, i), torch.randn(o, i), torch.randn(o)
    print(json.dumps({"kind": "linear", "case": [rows, i, o], "torch_ms": time_ms(lambda: F.linear(x, wt, bias))}))
for b, h, lq, lk, d in cases["attention"]:
    q, k, v = torch.randn(b, lq, h * d), torch.randn(b, lk, h * d), torch.randn(b, lk, h * d)

    def sdpa():
        split = lambda t: t.view(b, -1, h, d).transpose(1, 2)
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, lq, h * d)

    print(json.dumps({"kind": "attention", "case": [b, h, lq, lk, d], "torch_ms": time_ms(sdpa)}))
for b, c, g, h, w in cases["group_norm"]:
    x, wt, bias = torch.randn(b, c, h, w), torch.randn(c), torch.randn(c)
    print(json.dumps({"kind": "group_norm_silu", "case": [b, c, g, h, w],
                      "torch_ms": time_ms(lambda: F.silu(F.group_norm(x, g, wt, bias, 1e-6)))}))
