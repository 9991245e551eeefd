"""Side-by-side latency of jhakaas-worker and diffusers on the same model files, prompt, size,
steps, scheduler and initial noise. One command:

    .venv-ref/bin/python benches/compare/compare.py --arch sd15 --size 256 --steps 4

It (1) writes a random-weight pipeline with the architecture's real configs (make_model.py)
unless it exists, (2) alternates the sides run by run: diffusers in Python (reference.py),
our engine in-process (jhakaas-bench-engine) — each a fresh process doing a warm-up job, then
`--runs` timed jobs — and (3) our server over gRPC (time to health SERVING, then jobs through
jhakaas-load; one server start per round, alternated too). It reports medians and the ratio ours / diffusers for the whole job, text
encode, one UNet step (CFG batch 2), VAE decode, cold start and peak RSS; checks that both
sides produced the same image; and writes Markdown, JSON and SVG under benches/results/.
Needs: release builds of jhakaas-worker, jhakaas-bench-engine and jhakaas-load
(`cargo build --release -p jhakaas-worker -p jhakaas-benches --bins`) and the reference venv.
"""
import argparse
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a photograph of an astronaut riding a horse on the moon"


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and its SIMD flags that matter to both sides' kernels."""
    model, flags = "cpu", []
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "cpu":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split()
                         if f.startswith(("avx", "amx", "fma", "f16c"))]
    except OSError:
        pass
    return model, flags


def machine() -> str:
    model, _ = cpu_info()
    return f"{socket.gethostname()} ({model}, {os.cpu_count()} cores)"


def run_side(cmd: list[str], device: str) -> dict:
    start = time.time()
    proc = subprocess.Popen(cmd + [str(start), device], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def start_server(worker: Path, model: Path, device: str) -> tuple[subprocess.Popen, int, float]:
    """Starts our server; returns it, its port and the seconds from start to health SERVING."""
    port = 50600 + os.getpid() % 1000
    start = time.time()
    proc = subprocess.Popen(
        [str(worker), "serve", "--listen", f"127.0.0.1:{port}", "--metrics-listen", "127.0.0.1:0",
         "--device", device, "--model", f"bench={model}", "--log-format", "json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "JHAKAAS_LOG": "info"})
    for line in proc.stderr:
        if '"ready"' in line:
            return proc, port, time.time() - start
    raise SystemExit("server never became ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=120)


def serve_side(worker: Path, load: Path, model: Path, size: int, steps: int, runs: int, device: str) -> dict:
    proc, port, ready = start_server(worker, model, device)
    out = subprocess.run([str(load), "--addr", f"127.0.0.1:{port}", "--clients", "1", "--jobs", str(runs + 1),
                          "--steps", str(steps), "--side", str(size)], capture_output=True, text=True, check=True).stdout
    stop_server(proc)
    p50 = re.search(r"latency p50 ([0-9.]+)(ms|s)", out)
    job = float(p50.group(1)) / (1000 if p50.group(2) == "ms" else 1)
    return {"ready_s": ready, "job_p50_s": job, "raw": out}


def svg(cases: list[dict], path: Path, title: str) -> None:
    w, row, left = 760, 34, 230
    h = 60 + row * len(cases)
    worst = max(max(c["ratio"], 1.0) for c in cases)
    scale = (w - left - 80) / worst
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">',
             f'<text x="10" y="22" font-size="15">{title}</text>',
             f'<line x1="{left + scale}" y1="35" x2="{left + scale}" y2="{h - 10}" stroke="#888" stroke-dasharray="4"/>',
             f'<text x="{left + scale + 4}" y="{h - 12}" fill="#555">1.0 = diffusers</text>']
    for i, c in enumerate(cases):
        y = 45 + i * row
        color = "#2a9d4b" if c["ratio"] <= 1 else "#d2552d"
        parts.append(f'<text x="10" y="{y + 15}">{c["name"]}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{c["ratio"] * scale:.1f}" height="20" fill="{color}"/>')
        parts.append(f'<text x="{left + c["ratio"] * scale + 6:.1f}" y="{y + 15}">{c["ratio"]:.2f}×</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15", choices=["sd15", "sd21", "sdxl"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=2, help="timed jobs per process, after one warm-up")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two sides")
    ap.add_argument("--models", default=str(ROOT / "benches/compare/.models"))
    ap.add_argument("--target", default=str(ROOT / "target/release"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda runs fp16 on both sides")
    ap.add_argument("--results", default=str(ROOT / "benches/results"))
    ap.add_argument("--weights", default="f32", choices=["f32", "fp16"],
                    help="how the model files store the weights (fp16: what `fetch` prefers); "
                         "on the CPU both sides still compute in f32")
    ap.add_argument("--cpu-weights", default="f16", choices=["f32", "f16"],
                    help="our side's --cpu-weights (f16, the default: fp16 files stay f16 in memory; "
                         "f32: upcast at load)")
    a = ap.parse_args()
    os.environ["JHAKAAS_CPU_WEIGHTS"] = a.cpu_weights  # bench-engine and the served worker

    target = Path(a.target)
    fp16_files = a.weights == "fp16" and a.device == "cpu"
    model = Path(a.models) / (a.arch + ("-fp16" if fp16_files else ""))
    if not (model / "model_index.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benches/compare/make_model.py"), "--arch", a.arch, "--out", str(model),
                        "--tokenizer", str(ROOT / "tests/fixtures/models/sd1-tiny/tokenizer")]
                       + (["--fp16"] if fp16_files else []), check=True)
    h = a.size // 8
    latents = model / f"latents-{a.size}.safetensors"
    save_file({"latents": torch.randn((1, 4, h, h), generator=torch.Generator().manual_seed(0))}, str(latents))
    work = Path(a.models) / "out"
    work.mkdir(parents=True, exist_ok=True)
    common = [str(model), str(latents), PROMPT, str(a.steps), str(a.size), str(a.runs)]
    ours, theirs, ours_ready = [], [], []
    for r in range(a.rounds):
        theirs.append(run_side([sys.executable, str(ROOT / "benches/compare/reference.py"), *common,
                                str(work / "diffusers.png")], a.device))
        ours.append(run_side([str(target / "jhakaas-bench-engine"), *common, str(work / "ours.png")], a.device))
        if r + 1 < a.rounds:  # the last round's start is the gRPC run's below
            proc, _, ready_s = start_server(target / "jhakaas-worker", model, a.device)
            stop_server(proc)
            ours_ready.append(ready_s)
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    server = serve_side(target / "jhakaas-worker", target / "jhakaas-load", model, a.size, a.steps, a.runs, a.device)
    ours_ready.append(server["ready_s"])

    def med(side: list[dict], key: str) -> float:
        return statistics.median(run[key] for p in side for run in p["runs"])

    cases = []
    for name, key in [("end-to-end job", "job_s"), ("text encode (CFG)", "text_encode_s"),
                      ("UNet step (CFG batch 2)", "unet_step_s"), ("VAE decode", "vae_decode_s")]:
        o, t = med(ours, key), med(theirs, key)
        cases.append({"name": name, "ours_s": o, "reference_s": t, "ratio": o / t})
    o = statistics.median(p["cold_start_s"] for p in ours)
    t = statistics.median(p["cold_start_s"] for p in theirs)
    cases.append({"name": "cold start to first image", "ours_s": o, "reference_s": t, "ratio": o / t})
    ready = statistics.median(p["ready_s"] for p in theirs)
    ours_ready_s = statistics.median(ours_ready)
    cases.append({"name": "server start to SERVING", "ours_s": ours_ready_s, "reference_s": ready,
                  "ratio": ours_ready_s / ready, "note": "reference: diffusers process start to pipeline ready",
                  "ours_all_s": ours_ready, "reference_all_s": [p["ready_s"] for p in theirs]})
    cases.append({"name": "gRPC job (p50)", "ours_s": server["job_p50_s"], "reference_s": med(theirs, "job_s"),
                  "ratio": server["job_p50_s"] / med(theirs, "job_s")})
    o = statistics.median(p["peak_rss_mb"] for p in ours)
    t = statistics.median(p["peak_rss_mb"] for p in theirs)
    cases.append({"name": "peak RSS (MB)", "ours_s": o, "reference_s": t, "ratio": o / t, "unit": "MB"})

    a_img = np.asarray(Image.open(work / "ours.png").convert("RGB")).astype(np.int16)
    b_img = np.asarray(Image.open(work / "diffusers.png").convert("RGB")).astype(np.int16)
    diff = np.abs(a_img - b_img)
    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", socket.gethostname().lower()).strip("-")[:24] or "machine"
    precision = "fp16" if a.device == "cuda" else ("f32, fp16 weight files" if fp16_files else "f32")
    if a.device == "cpu":
        precision += f", ours --cpu-weights {a.cpu_weights}"
    gpu = torch.cuda.get_device_name(0) if a.device == "cuda" else None
    files = ("-fp16-files" if fp16_files else "") + f"-held-{a.cpu_weights}"
    stem = Path(a.results) / f"{date}-{slug}-{a.device}-{a.arch}{files}-{a.size}px-{a.steps}steps"
    cpu_model, cpu_flags = cpu_info()
    report = {"machine": machine() + (f", {gpu}" if gpu else ""), "cpu_model": cpu_model, "cpu_flags": cpu_flags,
              "our_isa": ours[0].get("isa"), "our_load_s": statistics.median(p["load_s"] for p in ours), "date": date, "device": a.device, "precision": precision, "arch": a.arch, "size": a.size, "steps": a.steps,
              "scheduler": "ddim", "guidance_scale": 7.5, "runs_per_side": a.rounds * a.runs,
              "torch": torch.__version__, "platform": platform.platform(),
              "parity": {"mean_abs_diff": float(diff.mean()), "max_abs_diff": int(diff.max())}, "cases": cases}
    stem.parent.mkdir(parents=True, exist_ok=True)  # a fresh --results folder
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# jhakaas vs diffusers — {a.arch}, {a.size}×{a.size}, {a.steps} DDIM steps, CFG 7.5, {a.device} {precision}",
             "", f"Machine: {report['machine']}; {date}; torch {torch.__version__}; "
             f"CPU flags: {' '.join(cpu_flags)}; our kernels: {report['our_isa']}; "
             f"{a.rounds} alternating rounds × {a.runs} timed jobs per side after a warm-up.", "",
             f"Parity (same files, same latents): mean |diff| {diff.mean():.3f}, max {diff.max()} on 0–255.", "",
             "| case | jhakaas | diffusers | ratio (ours ÷ diffusers) |", "|---|---|---|---|"]
    for c in cases:
        unit = c.get("unit", "s")
        lines.append(f"| {c['name']} | {c['ours_s']:.3f} {unit} | {c['reference_s']:.3f} {unit} | {c['ratio']:.2f} |")
    lines += ["", f"![ratios]({stem.name}.svg)"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    svg(cases, stem.with_suffix(".svg"), f"jhakaas ÷ diffusers, {a.arch} {a.size}px {a.steps} steps (lower is better)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
