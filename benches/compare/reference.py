"""The diffusers side of the comparison: one process, one model, timed stage by stage.

Prints one JSON line: cold start (process start to first image), ready (process start to the
pipeline loaded and ready, imports included), then per timed run the
end-to-end job, text encode, each UNet call and the VAE decode, plus peak RSS. The image of
the last run is written for the parity check.
Works for SD 1.x/2.x and SDXL pipelines (both text encoders count as text encode).
Usage: python reference.py MODEL_DIR LATENTS PROMPT STEPS SIZE RUNS OUT_PNG START_EPOCH [DEVICE]
DEVICE is cpu (float32) or cuda (float16), like jhakaas-worker's working precision.
"""
import json
import resource
import sys
import time

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

model, latents_path, prompt, steps, size, runs, out_png = sys.argv[1:8]
start = float(sys.argv[8])
device = sys.argv[9] if len(sys.argv) > 9 else "cpu"
steps, size, runs = int(steps), int(size), int(runs)
dtype = torch.float16 if device == "cuda" else torch.float32
torch.set_grad_enabled(False)
pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None).to(device)
# Both sides run DDIM from the checkpoint's own scheduler config.
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
xl = hasattr(pipe, "text_encoder_2")
pipe.set_progress_bar_config(disable=True)
# Process start (imports included) to a pipeline ready to run: what a server's SERVING compares to.
ready = time.time() - start
latents = load_file(latents_path)["latents"]
stage = {}


def sync():
    if device == "cuda":
        torch.cuda.synchronize()


def timed(module, name, method="forward"):
    original = getattr(module, method)

    def wrapper(*args, **kwargs):
        sync()
        t = time.perf_counter()
        out = original(*args, **kwargs)
        sync()
        stage.setdefault(name, []).append(time.perf_counter() - t)
        return out

    setattr(module, method, wrapper)


timed(pipe.text_encoder, "text_encode")
if xl:
    timed(pipe.text_encoder_2, "text_encode")
timed(pipe.unet, "unet_step")
timed(pipe.vae, "vae_decode", "decode")


def run():
    stage.clear()
    sync()
    t = time.perf_counter()
    img = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
               latents=latents.clone().to(device, dtype), output_type="np").images[0]
    sync()
    return img, time.perf_counter() - t, dict(stage)


img, _, _ = run()
cold_start = time.time() - start
results = []
for _ in range(runs):
    img, total, st = run()
    results.append({"job_s": total, "text_encode_s": sum(st["text_encode"]),
                    "unet_step_s": float(np.median(st["unet_step"])), "vae_decode_s": sum(st["vae_decode"])})
Image.fromarray((img * 255).round().astype(np.uint8)).save(out_png)
print(json.dumps({"cold_start_s": cold_start, "ready_s": ready, "runs": results,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
