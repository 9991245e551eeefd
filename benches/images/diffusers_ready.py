"""The Python worker's start to ready on the same files, for comparison with the image's
`podman run` to SERVING: import torch and diffusers, load the pipeline (f32, as the Python
worker does on a CPU) and run one 64x64 step, as our server's warm-up does. Prints seconds.

Usage: .venv-ref/bin/python benches/images/diffusers_ready.py MODEL_DIR
"""
import sys, time
t0 = time.time()
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32, safety_checker=None)
pipe(prompt="warm up", num_inference_steps=1, height=64, width=64, guidance_scale=1.0, output_type="pil")
print(f"{time.time() - t0:.2f}")
