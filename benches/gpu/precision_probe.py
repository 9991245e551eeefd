"""How much of an fp16 difference is the model's own sensitivity: generates the same image with
diffusers in fp16 and in fp32 (same files, latents, prompt, DDIM, CFG 7.5) at several step
counts, so `ours fp16 vs diffusers fp16` can be read against `diffusers fp16 vs diffusers fp32`.
Usage: python precision_probe.py MODEL LATENTS SIZE OUT_DIR STEPS...
Writes OUT_DIR/diffusers-{fp16,fp32}-{steps}.png.
"""
import sys

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

model, latents_path, size, out = sys.argv[1:5]
steps_list = [int(s) for s in sys.argv[5:]]
size = int(size)
latents = load_file(latents_path)["latents"]
prompt = "a photograph of an astronaut riding a horse on the moon"
torch.set_grad_enabled(False)
for name, dtype in [("fp16", torch.float16), ("fp32", torch.float32)]:
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to("cuda")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for steps in steps_list:
        img = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                   latents=latents.clone().to("cuda", dtype), output_type="np").images[0]
        Image.fromarray((img * 255).round().astype(np.uint8)).save(f"{out}/diffusers-{name}-{steps}.png")
    del pipe
    torch.cuda.empty_cache()
