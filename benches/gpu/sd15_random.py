"""Build an SD 1.5-architecture pipeline with random weights and time diffusers on it.

Latency depends on shapes, not weight values, so a random pipeline with SD 1.5's real configs
(UNet 320/640/1280/1280, CLIP ViT-L/14 text encoder, 4-block VAE) and the real CLIP tokenizer
gives honest timings without downloading anything. The script saves the pipeline in diffusers
layout (fp16 safetensors) so jhakaas-worker loads the very same files, records the initial
noise it used (`latents.safetensors`) and diffusers' image, and writes stage timings as JSON.

Usage: python sd15_random.py --out DIR --tokenizer DIR [--device cuda] [--size 512] [--steps 20]
"""
import argparse
import json
import time

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

PROMPT = "a photograph of an astronaut riding a horse on the moon"


def build(tokenizer_dir: str) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5's config otherwise
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    dtype = torch.float16 if a.device == "cuda" else torch.float32

    t0 = time.perf_counter()
    pipe = build(a.tokenizer).to(dtype)
    pipe.save_pretrained(a.out, safe_serialization=True)
    build_s = time.perf_counter() - t0
    pipe = pipe.to(a.device)
    pipe.set_progress_bar_config(disable=True)

    h = a.size // 8
    latents = torch.randn((1, 4, h, h), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    save_file({"latents": latents.contiguous()}, f"{a.out}/latents.safetensors")

    def run():
        return pipe(
            PROMPT, num_inference_steps=a.steps, guidance_scale=7.5, latents=latents.to(a.device, dtype),
            output_type="np",
        ).images[0]

    run()  # warm-up
    totals = []
    for _ in range(a.runs):
        sync(a.device)
        t = time.perf_counter()
        image = run()
        sync(a.device)
        totals.append(time.perf_counter() - t)
    Image.fromarray((image * 255).round().astype(np.uint8)).save(f"{a.out}/diffusers.png")

    # Stage timings, as the pipeline runs them.
    with torch.no_grad():
        sync(a.device)
        t = time.perf_counter()
        emb, neg = pipe.encode_prompt(PROMPT, a.device, 1, True, "")
        sync(a.device)
        text_s = time.perf_counter() - t
        ctx = torch.cat([neg, emb])
        x = torch.randn((2, 4, h, h), device=a.device, dtype=dtype)
        pipe.unet(x, 500, encoder_hidden_states=ctx)
        sync(a.device)
        t = time.perf_counter()
        for _ in range(5):
            pipe.unet(x, 500, encoder_hidden_states=ctx)
        sync(a.device)
        unet_s = (time.perf_counter() - t) / 5
        z = torch.randn((1, 4, h, h), device=a.device, dtype=dtype)
        pipe.vae.decode(z)
        sync(a.device)
        t = time.perf_counter()
        pipe.vae.decode(z)
        sync(a.device)
        vae_s = time.perf_counter() - t

    report = {
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
        "dtype": str(dtype), "size": a.size, "steps": a.steps, "torch": torch.__version__,
        "build_and_save_s": build_s, "job_s": sorted(totals), "text_encode_s": text_s,
        "unet_step_cfg_s": unet_s, "vae_decode_s": vae_s, "prompt": PROMPT,
    }
    with open(f"{a.out}/diffusers_timings.json", "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
