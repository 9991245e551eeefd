"""The torch-cuda check on a GPU: torch's own CUDA draws against ours, computed on the host.

    python3 benches/gpu/torch_cuda_randn.py OURS.safetensors benches/gpu/torch_cuda_plan.json OUT_DIR

OURS comes from `model-manager/examples/torch_cuda_draws.rs` (built and run where Rust is, by
build-cuda-binary.sh). For every seed of the plan a fresh `torch.Generator("cuda").manual_seed(seed)`
draws the plan's sizes in order (float32), as diffusers' `randn_tensor` does; the first size is
also drawn in float16 from a fresh generator and compared with ours rounded to float16. Writes
OUT_DIR/torch-cuda-randn.json (device, torch version, per draw: bit-exact share, max |diff|, max
ulps) and OUT_DIR/torch_cuda_randn.safetensors (torch's draws, `s{SEED}_d{K}`, to commit as the
oracle). Exit status 0 when every draw is within 1e-5 of torch's (the device's `__sincosf` is an
approximation we do not emulate); the report says whether it is bit-exact.
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file


def ulps(a, b):
    ia = a.view(torch.int32).to(torch.int64)
    ib = b.view(torch.int32).to(torch.int64)
    # Map the sign-magnitude floats onto one monotone integer line.
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max())


def main():
    ours_path, plan_path, out_dir = sys.argv[1:4]
    ours = load_file(ours_path)
    plan = json.load(open(plan_path))
    props = torch.cuda.get_device_properties(0)
    report = {"device": props.name, "multiprocessors": props.multi_processor_count,
              "max_threads_per_multiprocessor": getattr(props, "max_threads_per_multi_processor", None),
              "torch": torch.__version__, "draws": []}
    theirs, ok = {}, True
    for seed, sizes in plan["seeds"].items():
        g = torch.Generator("cuda").manual_seed(int(seed))
        for k, n in enumerate(sizes):
            name = f"s{seed}_d{k}"
            t = torch.randn(n, generator=g, device="cuda", dtype=torch.float32).cpu()
            theirs[name] = t
            o = ours[name]
            diff = float((t - o).abs().max())
            entry = {"draw": name, "n": n, "bit_exact_share": float((t == o).float().mean()),
                     "max_abs_diff": diff, "max_ulps": ulps(t, o)}
            report["draws"].append(entry)
            ok &= diff <= 1e-5
            print(entry, flush=True)
        half = torch.randn(sizes[0], generator=torch.Generator("cuda").manual_seed(int(seed)),
                           device="cuda", dtype=torch.float16).cpu()
        mine = ours[f"s{seed}_d0"].to(torch.float16)
        entry = {"draw": f"s{seed}_d0 float16", "n": sizes[0],
                 "bit_exact_share": float((half == mine).float().mean()),
                 "max_abs_diff": float((half.float() - mine.float()).abs().max())}
        report["draws"].append(entry)
        print(entry, flush=True)
    report["bit_exact"] = all(d["bit_exact_share"] == 1.0 for d in report["draws"])
    report["within_1e-5"] = ok
    save_file({k: v.contiguous() for k, v in theirs.items()}, f"{out_dir}/torch_cuda_randn.safetensors",
              metadata={"torch": torch.__version__, "device": props.name})
    json.dump(report, open(f"{out_dir}/torch-cuda-randn.json", "w"), indent=1)
    print("bit-exact:", report["bit_exact"], "within 1e-5:", ok)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
