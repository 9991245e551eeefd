"""Replays every committed fixture case through a jhakaas-worker binary on a device and
reports the difference to diffusers' image (the CPU/f32 reference) per case.

Usage: python fixture_parity.py BINARY DEVICE [PIPELINE...]
"""
import json
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

root = pathlib.Path(__file__).resolve().parents[2]
binary, device = sys.argv[1], sys.argv[2]
worst = (0.0, 0)
pipelines = sys.argv[3:] or ["sd1-tiny", "sd2-tiny", "sdxl-tiny", "sdxl-turbo-tiny", "sd-turbo-tiny"]
for pipeline in pipelines:
    ref = root / "tests/fixtures/reference" / pipeline
    for case in json.loads((ref / "cases.json").read_text()):
        out = pathlib.Path(f"/tmp/gpu-{pipeline}-{case['name']}.png")
        args = [binary, "generate", "--model", str(root / "tests/fixtures/models" / pipeline),
                "--prompt", case["prompt"], "--width", str(case["width"]), "--height", str(case["height"]),
                "--steps", str(case["steps"]), "--guidance-scale", str(case["guidance_scale"]),
                "--scheduler", case["scheduler"], "--num-images", str(case["num_images"]),
                "--latents", str(ref / case["noise"]), "--device", device, "--seed", "0", "--output", str(out)]
        if case["negative_prompt"] is not None:
            args += ["--negative-prompt", case["negative_prompt"]]
        if case.get("original_size"):
            args += ["--original-size", "{1}x{0}".format(*case["original_size"])]
        if case.get("crops_coords_top_left"):
            args += ["--crop-top-left", "{0},{1}".format(*case["crops_coords_top_left"])]
        if case.get("target_size"):
            args += ["--target-size", "{1}x{0}".format(*case["target_size"])]
        if case["init_image"]:
            args += ["--init-image", str(ref / case["init_image"]), "--strength", str(case["strength"])]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{pipeline}/{case['name']}: FAILED {r.stderr.strip()}")
            continue
        images = case["image"] if isinstance(case["image"], list) else [case["image"]]
        for i, want in enumerate(images):
            ours_path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}.png")
            a = np.asarray(Image.open(ours_path).convert("RGB")).astype(np.int16)
            b = np.asarray(Image.open(ref / want).convert("RGB")).astype(np.int16)
            d = np.abs(a - b)
            worst = (max(worst[0], d.mean()), max(worst[1], int(d.max())))
            print(f"{pipeline}/{case['name']}[{i}]: mean {d.mean():.3f} max {d.max()}")
print(f"worst: mean {worst[0]:.3f} max {worst[1]}")
