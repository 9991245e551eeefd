#!/usr/bin/env python3
"""Mutation self-check of the CUDA emulation's tests (see README.md).

Makes one mutant of model-manager/cuda/ per barrier removed (every `__syncthreads();` and
`__syncwarp();` in turn) and per bound flipped (every ` < `, ` <= `, ` > `, ` >= ` in code, one at
a time: `<` becomes `<=` and so on), builds each with the emulation (build.sh with
JHAKAAS_CUDA_SRC) and runs the kernel family's cases of model-manager/tests/cuda_emu.rs on it,
stopping at the first failing case. A mutant is caught when the tests fail; one that does not
compile is left out of the score. Prints one line per mutant and the score.

Usage: model-manager/cuda/emu/mutants.py [--list] [--only SUBSTRING]
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EMU = Path(__file__).resolve().parent
CUDA = EMU.parent
ROOT = CUDA.parent.parent
# The test (cuda_emu.rs) that runs each file's kernels; common.cuh feeds them all.
FAMILY = {"attention.cu": "attention", "group_norm.cu": "group_norm", "geglu.cu": "geglu"}
FLIP = {"<": "<=", "<=": "<", ">": ">=", ">=": ">"}


def mutants():
    """(file, line number, column, old text, new text, description) for every mutant."""
    for path in sorted(list(CUDA.glob("*.cu")) + list(CUDA.glob("*.cuh"))):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//")[0]
            if code.lstrip().startswith("#"):
                continue  # preprocessor lines: #include <…>, the architecture checks
            for m in re.finditer(r"__syncthreads\(\);|__syncwarp\(\);", code):
                yield path.name, number, m.start(), m.group(), ";", f"remove {m.group()}"
            for m in re.finditer(r" (<=|>=|<|>) ", code):
                op = m.group(1)
                yield path.name, number, m.start(), m.group(), f" {FLIP[op]} ", f"flip {op} to {FLIP[op]}"


def apply(src_dir, mutant):
    name, number, column, old, new, _ = mutant
    path = src_dir / name
    lines = path.read_text().splitlines(keepends=True)
    line = lines[number - 1]
    assert line[column : column + len(old)] == old, (mutant, line)
    lines[number - 1] = line[:column] + new + line[column + len(old) :]
    path.write_text("".join(lines))


def run(mutant, work):
    src, build = work / "src", work / "build"
    shutil.rmtree(work, ignore_errors=True)
    src.mkdir(parents=True)
    for f in list(CUDA.glob("*.cu")) + list(CUDA.glob("*.cuh")):
        shutil.copy(f, src / f.name)
    apply(src, mutant)
    env = dict(os.environ, JHAKAAS_CUDA_SRC=str(src))
    b = subprocess.run([str(EMU / "build.sh"), str(build)], env=env, capture_output=True, text=True)
    if b.returncode != 0:
        return "does not compile", ""
    env = dict(os.environ, JHAKAAS_CUDA_EMU=str(build), JHAKAAS_CUDA_EMU_FAIL_FAST="1")
    test = ["cargo", "test", "-q", "--locked", "-p", "jhakaas-model-manager", "--test", "cuda_emu"]
    family = FAMILY.get(mutant[0])
    if family:
        test.append(family)
    t = subprocess.run(test + ["--", "--nocapture"], cwd=ROOT, env=env, capture_output=True, text=True)
    if t.returncode == 0:
        return "survived", ""
    first = next((l for l in t.stderr.splitlines() if l.startswith("FAIL ")), "")
    how = first.split(": ", 2)[1] if first.count(": ") >= 1 else "tests failed"
    if "exit status: 66" in first:
        how += " (TSan race)"
    elif "AddressSanitizer" in t.stderr:
        how += " (ASan)"
    elif "depends on the thread order" in first:
        how += " (thread order)"
    elif "still running" in first:
        how += " (hang)"
    elif "cuda-emu:" in t.stderr:
        how += " (emulation check)"
    else:
        how += " (wrong values)"
    return "caught", how


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--only", help="run only mutants whose description or file contains this")
    args = parser.parse_args()
    all_mutants = [m for m in mutants() if not args.only or args.only in f"{m[0]}:{m[1]} {m[5]}"]
    if args.list:
        for m in all_mutants:
            print(f"{m[0]}:{m[1]} {m[5]}")
        return 0
    # The test binary once, so each mutant only rebuilds the emulation.
    subprocess.run(["cargo", "test", "-q", "--locked", "-p", "jhakaas-model-manager", "--test", "cuda_emu", "--no-run"], cwd=ROOT, check=True)
    caught = survived = 0
    with tempfile.TemporaryDirectory(prefix="jhakaas-mutants-") as tmp:
        for m in all_mutants:
            start = time.time()
            verdict, how = run(m, Path(tmp) / "m")
            print(f"{verdict:17} {m[0]}:{m[1]} {m[5]:22} {how} [{time.time() - start:.0f} s]", flush=True)
            caught += verdict == "caught"
            survived += verdict == "survived"
    total = caught + survived
    print(f"score: {caught}/{total} caught ({100 * caught / max(total, 1):.0f}%)")
    return 0 if total == 0 or caught / total >= 0.9 else 1


if __name__ == "__main__":
    sys.exit(main())
