"""Inpainting and ControlNet jobs side by side with diffusers (issue 23's benchmark). One command:

    .venv-ref/bin/python benches/compare/compare_tasks.py --arch sd15 --size 256 --steps 4

It (1) writes the random-weight SD 1.5-architecture pipeline (make_model.py) and a ControlNet
of its UNet's shape (make_controlnet.py: ControlNetModel.from_unet, random non-zero zero-convs)
unless they exist, and a deterministic init image, mask and control image at the job's size;
(2) for each task, alternates the sides round by round (the first side flips every round) —
diffusers in Python (reference_tasks.py: StableDiffusionInpaintPipeline /
StableDiffusionControlNetPipeline from the same files) and our engine in-process
(jhakaas-bench-engine with --init-image/--mask/--strength 1 or --controlnet/--control-image/
--controlnet-scale 1, once per `--residency` configuration, e.g. `resident,stage`) — each a
fresh process doing a warm-up job, then `--runs` timed jobs;
(3) reports per task the median job, text encode, denoise (UNet + ControlNet + VAE encode) and
VAE decode times, each process's peak RSS, cold start, the ratios ours ÷ diffusers, and the
image parity (both sides draw the noise from the same seed: ours `--rng torch-cpu`, diffusers
`torch.Generator("cpu").manual_seed(seed)`); and writes JSON, Markdown and SVG.
Same scheduler (DDIM, the checkpoint's own config), steps, CFG 7.5, no negative prompt, f32.
Needs release builds of jhakaas-bench-engine (`cargo build --release -p jhakaas-benches --bins`)
and the reference venv.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import PROMPT, ROOT, cpu_info, machine, svg  # noqa: E402


def control_images(size: int, out: Path) -> dict[str, Path]:
    """An init image (smooth colour field with shapes), a mask (white = repaint: a centred
    rectangle and a disc) and a control image (white strokes on black, like an edge map)."""
    out.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    init = np.stack([255 * x, 255 * y, 255 * (1 - 0.5 * (x + y))], -1)
    disc = (x - 0.3) ** 2 + (y - 0.65) ** 2 < 0.02
    init[disc] = [220, 60, 40]
    init[(np.abs(x - 0.7) < 0.12) & (np.abs(y - 0.3) < 0.08)] = [40, 160, 90]
    mask = np.zeros((size, size), np.uint8)
    mask[(np.abs(x - 0.5) < 0.25) & (np.abs(y - 0.45) < 0.2)] = 255
    mask[(x - 0.75) ** 2 + (y - 0.8) ** 2 < 0.01] = 255
    edges = np.zeros((size, size), np.uint8)
    w = 2.5 / size
    edges[(np.abs(x - y) < w) | (np.abs(x + y - 1.1) < w)] = 255
    edges[np.abs((x - 0.62) ** 2 + (y - 0.3) ** 2 - 0.025) < 0.004] = 255
    edges[(np.abs(y - 0.8) < w) & (x > 0.12) & (x < 0.88)] = 255
    paths = {"init": out / f"init-{size}.png", "mask": out / f"mask-{size}.png",
             "control": out / f"control-{size}.png"}
    Image.fromarray(init.round().astype(np.uint8), "RGB").save(paths["init"])
    Image.fromarray(mask, "L").save(paths["mask"])
    Image.fromarray(np.stack([edges] * 3, -1), "RGB").save(paths["control"])
    return paths


def run_side(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parity(a: Path, b: Path) -> dict:
    x = np.asarray(Image.open(a).convert("RGB")).astype(np.int16)
    y = np.asarray(Image.open(b).convert("RGB")).astype(np.int16)
    d = np.abs(x - y)
    return {"mean_abs_diff": float(d.mean()), "max_abs_diff": int(d.max()),
            "pixels_over_8": float((d.max(-1) > 8).mean())}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sd15", choices=["sd15"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3, help="timed jobs per process, after one warm-up")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the sides, per task")
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--tasks", default="inpaint,controlnet")
    ap.add_argument("--models", default=str(ROOT / "benches/compare/.models"))
    ap.add_argument("--target", default=str(ROOT / "target/release"))
    ap.add_argument("--results", default=str(ROOT / f"benches/results/{datetime.date.today()}-inpaint-controlnet"))
    ap.add_argument("--weights", default="f32", choices=["f32", "fp16"],
                    help="how the model and ControlNet files store the weights (fp16: what `fetch` prefers); "
                         "both sides still compute in f32")
    ap.add_argument("--cpu-weights", default="f16", choices=["f32", "f16"],
                    help="our side's --cpu-weights (f16, the default: fp16 files stay f16 in memory; f32 files "
                         "are held in f32 either way)")
    ap.add_argument("--residency", default="resident",
                    help="our side's --weights-residency, comma-separated to run several configurations of "
                         "ours in the same alternation (e.g. resident,stage)")
    a = ap.parse_args()
    variants = [r for r in a.residency.split(",") if r]
    if not variants or any(r not in ("resident", "stage") for r in variants):
        raise SystemExit("--residency: a comma-separated list of resident, stage")
    os.environ["JHAKAAS_CPU_WEIGHTS"] = a.cpu_weights
    models = Path(a.models)
    fp16 = a.weights == "fp16"
    model = models / (a.arch + ("-fp16" if fp16 else ""))
    net_dir = models / f"{model.name}-controlnet"
    if not (model / "model_index.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benches/compare/make_model.py"), "--arch", a.arch, "--out",
                        str(model), "--tokenizer", str(ROOT / "tests/fixtures/models/sd1-tiny/tokenizer")]
                       + (["--fp16"] if fp16 else []), check=True)
    if not (net_dir / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benches/compare/make_controlnet.py"), "--model", str(model),
                        "--out", str(net_dir)] + (["--fp16"] if fp16 else []), check=True)
    work = models / "out"
    images = control_images(a.size, work)
    engine = str(Path(a.target) / "jhakaas-bench-engine")
    tasks = [t for t in a.tasks.split(",") if t]
    ours = [f"ours-{r}" for r in variants]
    sides: dict[str, dict[str, list[dict]]] = {t: {side: [] for side in ["diffusers", *ours]} for t in tasks}
    for r in range(a.rounds):
        for task in tasks:
            if task == "inpaint":
                ref_extra = [str(images["init"]), str(images["mask"])]
                our_extra = ["--init-image", str(images["init"]), "--mask", str(images["mask"]), "--strength", "1"]
            else:
                ref_extra = [str(net_dir), str(images["control"])]
                our_extra = ["--controlnet", str(net_dir), "--control-image", str(images["control"]),
                             "--controlnet-scale", "1"]
            order = ["diffusers", *ours]
            if r % 2:
                order.reverse()
            for side in order:
                out_png = str(work / f"{task}-{side}{'-fp16' if fp16 else ''}.png")
                if side == "diffusers":
                    cmd = [sys.executable, str(ROOT / "benches/compare/reference_tasks.py"), task, str(model), PROMPT,
                           str(a.steps), str(a.size), str(a.runs), str(a.seed), out_png, str(time.time()),
                           *ref_extra]
                else:
                    cmd = [engine, str(model), "-", PROMPT, str(a.steps), str(a.size), str(a.runs), out_png,
                           str(time.time()), "cpu", "--seed", str(a.seed), "--rng", "torch-cpu",
                           "--scheduler", "ddim", "--weights-residency", side.removeprefix("ours-"), *our_extra]
                sides[task][side].append(run_side(cmd))
            print(f"round {r + 1}/{a.rounds} {task} done", flush=True)

    def med(procs: list[dict], key: str) -> float:
        return statistics.median(run[key] for p in procs for run in p["runs"])

    report_tasks = {}
    for task in tasks:
        theirs = sides[task]["diffusers"]
        stage_names = [("job", "job_s"), ("text encode (CFG)", "text_encode_s"),
                       ("denoise (UNet" + (" + ControlNet" if task == "controlnet" else " + VAE encode") + ")",
                        "denoise_s"), ("VAE decode", "vae_decode_s")]
        per_variant = {}
        for side in ours:
            mine = sides[task][side]
            cases = []
            for name, key in stage_names:
                o, t = med(mine, key), med(theirs, key)
                cases.append({"name": name, "ours_s": o, "reference_s": t, "ratio": o / t,
                              "ours_range_s": [min(run[key] for p in mine for run in p["runs"]),
                                               max(run[key] for p in mine for run in p["runs"])]})
            o = statistics.median(p["cold_start_s"] for p in mine)
            t = statistics.median(p["cold_start_s"] for p in theirs)
            cases.append({"name": "cold start to first image", "ours_s": o, "reference_s": t, "ratio": o / t})
            o = statistics.median(p["peak_rss_mb"] for p in mine)
            t = statistics.median(p["peak_rss_mb"] for p in theirs)
            cases.append({"name": "peak RSS", "ours_s": o, "reference_s": t, "ratio": o / t, "unit": "MB",
                          "ours_range": [min(p["peak_rss_mb"] for p in mine), max(p["peak_rss_mb"] for p in mine)]})
            per_variant[side.removeprefix("ours-")] = {
                "cases": cases,
                "parity": parity(work / f"{task}-{side}{'-fp16' if fp16 else ''}.png",
                                 work / f"{task}-diffusers{'-fp16' if fp16 else ''}.png"),
                "raw": mine}
        extra = {"diffusers_unet_s": med(theirs, "unet_s"), "diffusers_unet_calls": theirs[0]["runs"][0]["unet_calls"],
                 "diffusers_controlnet_s": med(theirs, "controlnet_s"),
                 "diffusers_vae_encode_s": med(theirs, "vae_encode_s"),
                 "diffusers_vae_encode_calls": theirs[0]["runs"][0]["vae_encode_calls"],
                 "diffusers_threads": theirs[0].get("threads"),
                 "diffusers_job_range_s": [min(run["job_s"] for p in theirs for run in p["runs"]),
                                           max(run["job_s"] for p in theirs for run in p["runs"])]}
        report_tasks[task] = {"ours": per_variant, "diffusers_stages": extra, "raw_diffusers": theirs}

    date = datetime.date.today().isoformat()
    cpu_model, cpu_flags = cpu_info()
    import diffusers
    report = {"machine": machine(), "cpu_model": cpu_model, "cpu_flags": cpu_flags, "cores": os.cpu_count(),
              "our_isa": sides[tasks[0]][ours[0]][0].get("isa"), "our_weights_residency": variants, "commit": git_commit(), "date": date,
              "device": "cpu", "precision": f"f32 compute ({a.weights} files; ours --cpu-weights {a.cpu_weights})", "arch": a.arch,
              "size": a.size, "steps": a.steps, "scheduler": "ddim", "guidance_scale": 7.5, "seed": a.seed,
              "rng": "torch-cpu", "rounds": a.rounds, "runs_per_process": a.runs,
              "torch": torch.__version__, "diffusers": diffusers.__version__, "platform": platform.platform(),
              "tasks": report_tasks}
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"{date}-cpu-{a.arch}{'-fp16-files' if fp16 else ''}-inpaint-controlnet-{a.size}px-"
                  f"{a.steps}steps")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# jhakaas vs diffusers — inpainting and ControlNet, {a.arch}, {a.size}×{a.size}, {a.steps} DDIM "
             f"steps, CFG 7.5, cpu, {report['precision']}", "",
             f"Machine: {report['machine']}; {date}; commit {report['commit']}; torch {torch.__version__} "
             f"({report_tasks[tasks[0]]['diffusers_stages']['diffusers_threads']} threads), diffusers "
             f"{diffusers.__version__}; CPU flags: {' '.join(cpu_flags)}; our kernels: {report['our_isa']}; "
             f"{a.rounds} alternating rounds × {a.runs} timed jobs per side and task after a warm-up; seed "
             f"{a.seed}, torch CPU generator on both sides.", ""]
    chart = []
    for task in tasks:
        rt = report_tasks[task]
        head = " | ".join(f"jhakaas ({v})" for v in variants)
        ratio_head = " | ".join(f"ratio ({v})" for v in variants)
        lines += [f"## {task}", ""]
        for v in variants:
            p = rt["ours"][v]["parity"]
            lines.append(f"Parity, ours ({v}) vs diffusers (same files, same seed): mean |diff| "
                         f"{p['mean_abs_diff']:.3f}, max {p['max_abs_diff']} on 0–255; "
                         f"{100 * p['pixels_over_8']:.2f}% of pixels differ by more than 8.")
        lines += ["", f"| case | {head} | diffusers | {ratio_head} |",
                  "|---|" + "---|" * (2 * len(variants) + 1)]
        for i, c0 in enumerate(rt["ours"][variants[0]]["cases"]):
            unit = c0.get("unit", "s")
            cs = [rt["ours"][v]["cases"][i] for v in variants]
            lines.append(f"| {c0['name']} | " + " | ".join(f"{c['ours_s']:.3f} {unit}" for c in cs)
                         + f" | {c0['reference_s']:.3f} {unit} | " + " | ".join(f"{c['ratio']:.2f}" for c in cs) + " |")
            if c0["name"] in ("job", "peak RSS"):
                for v, c in zip(variants, cs):
                    chart.append({"name": f"{task} {c0['name']} ({v})", "ratio": c["ratio"]})
        d = rt["diffusers_stages"]
        lines += ["", f"diffusers' denoise: UNet {d['diffusers_unet_s']:.3f} s ({d['diffusers_unet_calls']} calls), "
                      f"ControlNet {d['diffusers_controlnet_s']:.3f} s, VAE encode {d['diffusers_vae_encode_s']:.3f} s "
                      f"({d['diffusers_vae_encode_calls']} calls).", ""]
    lines.append(f"![ratios]({stem.name}.svg)")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    svg(chart, stem.with_suffix(".svg"), f"jhakaas ÷ diffusers, inpaint / ControlNet, {a.arch} {a.size}px "
                                         f"{a.steps} steps (lower is better)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
