"""Writes a random kohya-format LoRA of rank R for a diffusers SD pipeline's UNet (every
attention projection, feed-forward and 1×1 projection, as kohya's sd-scripts trains by
default), for timing the merge: `python make_lora.py MODEL_DIR OUT.safetensors [RANK]`."""

import json
import struct
import sys

import torch
from safetensors.torch import save_file

model, out = sys.argv[1], sys.argv[2]
rank = int(sys.argv[3]) if len(sys.argv) > 3 else 32
path = f"{model}/unet/diffusion_pytorch_model.safetensors"
with open(path, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
targets = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "ff.net.0.proj.weight",
           "ff.net.2.weight", "proj_in.weight", "proj_out.weight")
g = torch.Generator().manual_seed(0)
tensors = {}
for name, meta in header.items():
    if name == "__metadata__" or not name.endswith(targets):
        continue
    shape = meta["shape"]
    o, i = shape[0], shape[1]
    rest = tuple(shape[2:])
    module = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
    tensors[module + ".lora_down.weight"] = torch.randn((rank, i) + rest, generator=g) * 0.01
    tensors[module + ".lora_up.weight"] = torch.randn((o, rank) + (1,) * len(rest), generator=g) * 0.01
    tensors[module + ".alpha"] = torch.tensor(float(rank))
save_file(tensors, out)
print(f"{len(tensors) // 3} modules, rank {rank}")
