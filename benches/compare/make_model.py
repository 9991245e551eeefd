"""Write a full-size Stable Diffusion pipeline with random weights in diffusers layout.

Latency depends on shapes, not weight values: `--arch sd15` uses SD 1.5's real configs (UNet
320/640/1280/1280 with 768-wide cross-attention, CLIP ViT-L/14, 4-block VAE), `--arch sd21`
SD 2.1's / SD-Turbo's (1024-wide OpenCLIP-H text encoder with 23 layers, linear projections,
per-block heads, v-prediction), `--arch sdxl` SDXL base 1.0's (UNet 320/640/1280 with
transformer depths 1/2/10, 2048-wide context and text_time conditioning, CLIP ViT-L + OpenCLIP
bigG with its projection, force_upcast VAE with scaling 0.13025), all with the real 49408-token
CLIP tokenizer, so diffusers and jhakaas-worker load the very same files. Nothing is
downloaded. With a GPU, the weights are initialised on it (SDXL's 3.5 B parameters take minutes
on a CPU).

Usage: python make_model.py --arch sd15 --out DIR --tokenizer tests/fixtures/models/sd1-tiny/tokenizer
"""
import argparse
import shutil

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def build_sdxl(tokenizer_dir: str) -> StableDiffusionXLPipeline:
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
        scaling_factor=0.13025, force_upcast=True,
    )
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
        bos_token_id=0, eos_token_id=2, pad_token_id=1))
    with torch.device("cpu"):  # schedulers do numpy round trips
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="leading", steps_offset=1)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_2.pad_token = "!"
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)


def build(arch: str, tokenizer_dir: str):
    torch.manual_seed(0)
    if arch == "sdxl":
        return build_sdxl(tokenizer_dir)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    )
    if arch == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
        with torch.device("cpu"):
            scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    elif arch == "sd21":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True, upcast_attention=True)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512))
        with torch.device("cpu"):
            scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               prediction_type="v_prediction", timestep_spacing="trailing",
                                               steps_offset=1)
    else:
        raise SystemExit(f"unknown --arch {arch}")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if arch == "sd21":
        tokenizer.pad_token = "!"
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sd21", "sdxl"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--fp16", action="store_true", help="store fp16 weights (always on a GPU)")
    a = ap.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        pipe = build(a.arch, a.tokenizer)
    if device == "cuda" or a.fp16:
        pipe.to(torch.float16)  # what a published checkpoint's fp16 files hold
    pipe.save_pretrained(a.out, safe_serialization=True)
    print(f"wrote {a.arch} to {a.out}")


if __name__ == "__main__":
    main()
