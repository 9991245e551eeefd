"""Write a random-weight ControlNet of a pipeline's UNet shape, in diffusers layout, for the
ControlNet comparison (compare_tasks.py).

`ControlNetModel.from_unet(unet)` copies the UNet's encoder (SD 1.5's: 320/640/1280/1280, 768-wide
cross-attention, ~361 M parameters), then, as tests/fixtures/generate_controlnet_fixtures.py
does for the tiny fixture net: every parameter gets seeded noise (10% of its tensor's std), the
zero-initialised convs (controlnet_down_blocks, controlnet_mid_block, the conditioning
embedding's conv_out) get torch's default Conv2d init so the residuals are non-zero, and the
conditioning embedding's convs are He-initialised and conv_out scaled so the embedded control
image is as large as conv_in's output (otherwise the control image would barely matter).
Latency depends on shapes only; the non-zero residuals make the image parity check meaningful.
Nothing is downloaded. Saved in the model files' dtype (f32 unless --fp16).

Usage: python make_controlnet.py --model benches/compare/.models/sd15 --out benches/compare/.models/sd15-controlnet
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

# The fixtures' ControlNet maker owns how a random net is made to move the image.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
from generate_controlnet_fixtures import strengthen_embedding_  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a diffusers pipeline folder (its unet/ is used)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--fp16", action="store_true", help="store fp16 weights")
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet", torch_dtype=torch.float32).eval()
    torch.manual_seed(a.seed)
    cn = ControlNetModel.from_unet(unet)
    g = torch.Generator().manual_seed(a.seed + 1)
    for _, p in sorted(cn.named_parameters()):
        std = float(p.std()) if p.numel() > 1 else 0.0
        p.add_(torch.randn(p.shape, generator=g) * (0.1 * std if std > 0 else 0.01))
    for conv in list(cn.controlnet_down_blocks) + [cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
        conv.reset_parameters()
    strengthen_embedding_(cn, unet, a.seed + 2, latent_side=32)
    assert all(float(c.weight.abs().max()) > 0 for c in cn.controlnet_down_blocks)
    if a.fp16:
        cn.to(torch.float16)
    shutil.rmtree(a.out, ignore_errors=True)
    cn.save_pretrained(a.out, safe_serialization=True)
    n = sum(p.numel() for p in cn.parameters())
    print(f"wrote a ControlNet of {a.model}'s UNet ({n / 1e6:.0f} M parameters) to {a.out}")


if __name__ == "__main__":
    main()
