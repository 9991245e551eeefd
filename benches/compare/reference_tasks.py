"""The diffusers side of the inpainting / ControlNet comparison (compare_tasks.py): one process,
one pipeline, timed stage by stage.

  inpaint:    StableDiffusionInpaintPipeline from the model folder (a 4-channel UNet: diffusers
              blends the noised init latents outside the mask at every step), init image + mask,
              strength 1;
  controlnet: StableDiffusionControlNetPipeline from the model folder and a ControlNetModel
              folder, one control image, controlnet_conditioning_scale 1.

Both: DDIM from the checkpoint's scheduler config, CFG 7.5, no negative prompt, noise from
`generator=torch.Generator("cpu").manual_seed(SEED)` (what our `--rng torch-cpu --seed SEED`
replays), float32. Prints one JSON line like reference.py's: cold start (process start to the
first image), ready (process start to the pipeline loaded), per timed run the job, text encode,
the summed UNet, ControlNet, VAE encode and VAE decode calls, and the process's peak RSS. The
last run's image is written for the parity check.

Usage: python reference_tasks.py TASK MODEL_DIR PROMPT STEPS SIZE RUNS SEED OUT_PNG START_EPOCH
           (inpaint: INIT_PNG MASK_PNG | controlnet: CONTROLNET_DIR CONTROL_PNG)
"""
import json
import resource
import sys
import time

import numpy as np
import torch
from diffusers import (ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline,
                       StableDiffusionInpaintPipeline)
from PIL import Image

task, model, prompt, steps, size, runs, seed, out_png, start = sys.argv[1:10]
extra = sys.argv[10:]
start = float(start)
steps, size, runs, seed = int(steps), int(size), int(runs), int(seed)
torch.set_grad_enabled(False)
common = dict(torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
if task == "inpaint":
    pipe = StableDiffusionInpaintPipeline.from_pretrained(model, **common)
    init = Image.open(extra[0]).convert("RGB")
    mask = Image.open(extra[1])
    call = dict(image=init, mask_image=mask, strength=1.0)
elif task == "controlnet":
    net = ControlNetModel.from_pretrained(extra[0], torch_dtype=torch.float32)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(model, controlnet=net, **common)
    call = dict(image=Image.open(extra[1]).convert("RGB"), controlnet_conditioning_scale=1.0)
else:
    raise SystemExit(f"unknown task {task}")
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
ready = time.time() - start
stage = {}


def timed(module, name, method="forward"):
    original = getattr(module, method)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = original(*args, **kwargs)
        stage.setdefault(name, []).append(time.perf_counter() - t)
        return out

    setattr(module, method, wrapper)


timed(pipe.text_encoder, "text_encode")
timed(pipe.unet, "unet")
timed(pipe.vae, "vae_encode", "encode")
timed(pipe.vae, "vae_decode", "decode")
if task == "controlnet":
    timed(pipe.controlnet, "controlnet")


def run():
    stage.clear()
    t = time.perf_counter()
    img = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call).images[0]
    return img, time.perf_counter() - t, dict(stage)


img, _, _ = run()
cold_start = time.time() - start
results = []
for _ in range(runs):
    img, total, st = run()
    s = {k: sum(v) for k, v in st.items()}
    results.append({"job_s": total, "text_encode_s": s.get("text_encode", 0.0), "unet_s": s.get("unet", 0.0),
                    "unet_calls": len(st.get("unet", [])), "controlnet_s": s.get("controlnet", 0.0),
                    "vae_encode_s": s.get("vae_encode", 0.0), "vae_encode_calls": len(st.get("vae_encode", [])),
                    "vae_decode_s": s.get("vae_decode", 0.0),
                    "denoise_s": s.get("unet", 0.0) + s.get("controlnet", 0.0) + s.get("vae_encode", 0.0)})
Image.fromarray((img * 255).round().astype(np.uint8)).save(out_png)
print(json.dumps({"cold_start_s": cold_start, "ready_s": ready, "runs": results,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
