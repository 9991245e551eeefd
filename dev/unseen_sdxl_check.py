#!/usr/bin/env python3
"""Parity on SDXL-family pipelines nobody wrote the engine against: samples random tiny
StableDiffusionXLPipeline configs (block count and widths, heads, transformer depths, resnets
per block, norm groups, text encoder widths and depths, projection and time-id widths, eos
pooling rule, VAE depth, force_zeros_for_empty_prompt, scheduler), has diffusers generate an
image with injected latents, replays the same latents through `jhakaas-worker generate` and
reports mean/max |diff| on 0-255 (bound: mean <= 0.5, max <= 6, as the committed cases).

Usage (reference venv, release or debug binary):
    .venv-ref/bin/python dev/unseen_sdxl_check.py --binary target/debug/jhakaas-worker --count 8
Needs the open_clip wheel for the BPE (see tests/fixtures/generate_fixtures.py, --bpe).
"""
import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/fixtures"))
import generate_fixtures as gf  # noqa: E402
import generate_sdxl_fixtures as gx  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionXLPipeline  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402


def sample_config(rng: random.Random):
    n = rng.choice([1, 2, 3])
    base = rng.choice([8, 16])
    groups = rng.choice([g for g in (1, 2, 4, 8) if base % g == 0])
    widths = [base * 2 ** min(i, 2) for i in range(n)]
    kinds = [rng.choice(["DownBlock2D", "CrossAttnDownBlock2D"]) for _ in range(n)]
    if "CrossAttnDownBlock2D" not in kinds:
        kinds[-1] = "CrossAttnDownBlock2D"
    up = ["CrossAttnUpBlock2D" if k == "CrossAttnDownBlock2D" else "UpBlock2D" for k in reversed(kinds)]
    heads = [rng.choice([h for h in (1, 2, 4) if w % h == 0]) for w in widths]
    te1 = dict(hidden_size=rng.choice([16, 24, 32]), num_hidden_layers=rng.choice([1, 2, 3]),
               num_attention_heads=2, hidden_act=rng.choice(["quick_gelu", "gelu"]), projection_dim=8)
    te1["intermediate_size"] = te1["hidden_size"] * 2 + rng.choice([0, 3])
    hidden2 = rng.choice([16, 24, 40])
    te2 = dict(hidden_size=hidden2, num_hidden_layers=rng.choice([2, 3]), num_attention_heads=rng.choice([2, 4]),
               hidden_act="gelu", projection_dim=rng.choice([hidden2, 12]), intermediate_size=hidden2 * 2)
    if rng.random() < 0.5:
        te2.update(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # SDXL's stale ids: argmax pooling
    tdim = rng.choice([4, 6, 8])
    unet = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=tuple(widths),
                down_block_types=tuple(kinds), up_block_types=tuple(up),
                layers_per_block=rng.choice([1, 2, [1, 2, 1][:n]]) if n > 1 else rng.choice([1, 2]),
                transformer_layers_per_block=[rng.choice([1, 2]) for _ in range(n)],
                attention_head_dim=heads if n > 1 else heads[0], use_linear_projection=rng.random() < 0.7,
                cross_attention_dim=te1["hidden_size"] + hidden2, norm_num_groups=groups,
                addition_embed_type="text_time", addition_time_embed_dim=tdim,
                projection_class_embeddings_input_dim=6 * tdim + te2["projection_dim"],
                mid_block_type=rng.choice(["UNetMidBlock2DCrossAttn", None]))
    vae_blocks = rng.choice([2, 3, 4])
    vae = dict(block_out_channels=tuple([16, 32, 32, 32][:vae_blocks]), down_block_types=("DownEncoderBlock2D",) * vae_blocks,
               up_block_types=("UpDecoderBlock2D",) * vae_blocks, layers_per_block=1, latent_channels=4,
               norm_num_groups=8, sample_size=64, scaling_factor=rng.choice([0.13025, 0.5]), force_upcast=True)
    return dict(te1=te1, te2=te2, unet=unet, vae=vae, force_zeros=rng.random() < 0.7,
                scheduler=rng.choice(list(gf.SCHEDULERS)), cfg=rng.choice([1.0, 4.0]),
                negative=rng.choice([None, "blurry"]), steps=rng.choice([2, 3, 4]))


def build(cfg, seed, vocab, merges, tmp: Path, out: Path):
    torch.manual_seed(seed)
    unet = gf.build_unet(seed + 1, **cfg["unet"])
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**cfg["vae"])
    gf.perturb_constants_(vae, seed + 3)
    gf.f16_round_(vae)
    te = gx.build_text(CLIPTextModel, seed + 4, gx.text_config(cfg["te1"], vocab))
    te2 = gx.build_text(CLIPTextModelWithProjection, seed + 5, gx.text_config(cfg["te2"], vocab))
    tok = gx.make_small_tokenizer(tmp / "tok", vocab, merges, "<|endoftext|>")
    tok2 = gx.make_small_tokenizer(tmp / "tok2", vocab, merges, "!")
    from diffusers import EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler.from_config({k: v for k, v in gx.SDXL_SCHEDULER.items() if not k.startswith("_")})
    pipe = StableDiffusionXLPipeline(vae=vae.eval(), text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=cfg["force_zeros"],
                                     add_watermarker=False)
    pipe.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    gf.write_tokenizer_files(out / "tokenizer", vocab, merges, "<|endoftext|>")
    gf.write_tokenizer_files(out / "tokenizer_2", vocab, merges, "!")
    reloaded = StableDiffusionXLPipeline.from_pretrained(str(out), dtype=torch.float32)
    reloaded.set_progress_bar_config(disable=True)
    return reloaded


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default=str(ROOT / "target/debug/jhakaas-worker"))
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--bpe")
    a = ap.parse_args()
    torch.set_num_threads(1)
    vocab, merges = gx.build_small_vocab(gf.read_bpe_text(a.bpe))
    rng = random.Random(a.seed)
    worst, failures = (0.0, 0), 0
    for i in range(a.count):
        cfg = sample_config(rng)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model = tmp / "model"
            pipe = build(cfg, a.seed + 100 * i, vocab, merges, tmp, model)
            sched_cls, extra = gf.SCHEDULERS[cfg["scheduler"]]
            pipe.scheduler = sched_cls.from_config(pipe.scheduler.config, **extra)
            scale = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
            w, h = 64, 48
            g = torch.Generator().manual_seed(i)
            latents = torch.randn((1, 4, h // scale, w // scale), generator=g)
            noise = {"latents": latents}
            with gx.XLNoiseSpy("record") as spy, torch.no_grad():
                img = pipe("a lighthouse on a cliff", negative_prompt=cfg["negative"], height=h, width=w,
                           num_inference_steps=cfg["steps"], guidance_scale=cfg["cfg"], latents=latents.clone(),
                           generator=g, output_type="np").images[0]
            if spy.draws:
                noise["step_noise"] = torch.stack([d[3] for d in spy.draws])
            save_file(noise, str(tmp / "noise.safetensors"))
            Image.fromarray((img * 255).round().astype(np.uint8)).save(tmp / "ref.png")
            args = [a.binary, "generate", "--model", str(model), "--prompt", "a lighthouse on a cliff",
                    "--width", str(w), "--height", str(h), "--steps", str(cfg["steps"]),
                    "--guidance-scale", str(cfg["cfg"]), "--scheduler", cfg["scheduler"],
                    "--latents", str(tmp / "noise.safetensors"), "--device", "cpu", "--output", str(tmp / "ours.png")]
            if cfg["negative"] is not None:
                args += ["--negative-prompt", cfg["negative"]]
            r = subprocess.run(args, capture_output=True, text=True)
            summary = json.dumps({k: cfg[k] for k in ("scheduler", "cfg", "negative", "force_zeros")}
                                 | {"blocks": cfg["unet"]["block_out_channels"], "vae_blocks": len(cfg["vae"]["block_out_channels"]),
                                    "te2": [cfg["te2"]["hidden_size"], cfg["te2"]["projection_dim"], cfg["te2"].get("eos_token_id")]})
            if r.returncode != 0:
                failures += 1
                print(f"[{i}] FAILED to run: {r.stderr.strip()[-300:]}  {summary}")
                continue
            d = np.abs(np.asarray(Image.open(tmp / "ours.png")).astype(np.int16)
                       - np.asarray(Image.open(tmp / "ref.png")).astype(np.int16))
            ok = d.mean() <= 0.5 and d.max() <= 6
            failures += not ok
            worst = (max(worst[0], d.mean()), max(worst[1], int(d.max())))
            std = float(np.asarray(Image.open(tmp / "ref.png")).std())
            print(f"[{i}] {'ok ' if ok else 'OFF'} mean {d.mean():.4f} max {d.max():3d} (image std {std:4.1f})  {summary}")
    print(f"{a.count} unseen configs, {failures} off; worst mean {worst[0]:.4f} max {worst[1]}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
