"""`make gpu-check`: the pack's test suite and decoder benchmark on one NVIDIA GPU, in one prepared run.

For a Linux machine with Python 3.12 and a CUDA torch but no internet. Prepare here with
`bash tools/gpu_bundle.sh` (ComfyUI's tree and the missing wheels into .gpu_bundle/), carry .gpu_bundle
there, and run `make gpu-check`. It installs the wheels into a private folder, builds the tiny models
on that machine, then runs ComfyUI WITHOUT --cpu:
  1. the whole suite (browser test aside) with models and VAEs in fp32;
  2. the node tests with fp16 and with bf16 models and VAEs (a failure there says what 16 bit breaks);
  3. `python -m bench decoder` (QUICK), which records torch.cuda.max_memory_allocated on a GPU.
Each step has a time budget so the whole run stays under 8 minutes. It writes bench/results/gpu_check.json
(summary: device, passed, failed, per-run counts and the decoder benchmark's summary) and copies it and
the logs to $OUT when that is set.
"""
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / ".gpu_bundle"
WORK = Path(os.environ.get("EI_GPU_WORK", "/tmp/ei-gpu"))
NODE_TESTS = ["tests/test_exact_nodes.py", "tests/test_preciseinv_nodes.py", "tests/test_rf_nodes.py",
              "tests/test_decoder_node.py", "tests/test_device_guard.py", "tests/test_video.py",
              "tests/test_watermark_nodes.py",
              # the 30 every-sampler round trips (thousands of model calls) run in fp32 only: the 16-bit runs
              # must fit the device budget
              "-k", "not every_deterministic_sampler"]
RUNS = [  # name, ComfyUI precision flags, tests, seconds (the CPU suite takes about 500 s; the device, 15 min in all)
    ("fp32", "--fp32-unet --fp32-vae", ["tests"], 330),
    ("fp16", "--fp16-unet --fp16-vae", NODE_TESTS, 90),
    ("bf16", "--bf16-unet --bf16-vae", NODE_TESTS, 90),
]
DECODER_SECONDS = 60


def prepare():
    """Wheels into WORK/site, ComfyUI into WORK/ComfyUI; returns the environment for the runs."""
    if not (BUNDLE / "ComfyUI.tar.gz").exists():
        sys.exit(f"{BUNDLE}/ComfyUI.tar.gz is missing: run `bash tools/gpu_bundle.sh` where there is internet, "
                 f"and carry .gpu_bundle")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    wheels = sorted(str(p) for p in (BUNDLE / "whl").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(WORK / "site"), *wheels], check=True)
    with tarfile.open(BUNDLE / "ComfyUI.tar.gz") as tar:
        tar.extractall(WORK)
    comfy = next(p for p in WORK.iterdir() if (p / "main.py").exists())
    (comfy / "extra_model_paths.yaml").unlink(missing_ok=True)
    paths = [str(WORK / "site"), os.environ.get("PYTHONPATH", ""), str(REPO / "tools" / "gpu_stubs")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "COMFYUI_DIR": str(comfy),
            "COMFY_PYTHON": sys.executable, "EXACT_INVERSION_CACHE": str(WORK / "cache"),
            "EI_COMFY_DEVICE": "gpu", "PYTHONUNBUFFERED": "1"}


def junit_counts(path):
    if not path.exists():
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": ["no report: the run was cut off"]}
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    failures = [f"{case.get('classname')}::{case.get('name')}: "
                f"{(case.find('failure') if case.find('failure') is not None else case.find('error')).get('message', '')[:300]}"
                for case in suite.iter("testcase") if case.find("failure") is not None or case.find("error") is not None]
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": total - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped,
            "failures": failures}


def run_tests(env, name, flags, tests, seconds, logs):
    report = logs / f"junit-{name}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not browser",
           f"--junitxml={report}", *tests]
    start = time.time()
    with open(logs / f"tests-{name}.log", "w") as log:
        try:
            code = subprocess.run(cmd, cwd=REPO, env={**env, "EI_COMFY_ARGS": flags}, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=seconds).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    counts = junit_counts(report)
    print(f"[gpu-check] {name}: {counts['passed']} passed, {counts['failed'] + counts['errors']} failed, "
          f"{counts['skipped']} skipped in {time.time() - start:.0f} s (exit {code})", flush=True)
    return {"name": name, "flags": flags, "tests": tests, "exit": code, "seconds": round(time.time() - start, 1),
            **counts}


def run_decoder_bench(env, logs):
    start = time.time()
    with open(logs / "bench-decoder.log", "w") as log:
        try:
            code = subprocess.run([sys.executable, "-m", "bench", "decoder"], cwd=REPO, env={**env, "QUICK": "1"},
                                  stdout=log, stderr=subprocess.STDOUT, timeout=DECODER_SECONDS).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = REPO / "bench" / "results" / "decoder.quick.json"
    summary = json.loads(result.read_text()).get("summary", {}) if code == 0 and result.exists() else {}
    print(f"[gpu-check] decoder bench: exit {code} in {time.time() - start:.0f} s", flush=True)
    return {"exit": code, "seconds": round(time.time() - start, 1), "summary": summary}


def main():
    import torch
    if not torch.cuda.is_available():
        sys.exit("gpu-check needs a CUDA GPU (torch.cuda.is_available() is False)")
    device = torch.cuda.get_device_name(0)
    print(f"[gpu-check] {device}, torch {torch.__version__}, Python {platform.python_version()}", flush=True)
    env, start = prepare(), time.time()
    logs = WORK / "logs"
    logs.mkdir()
    subprocess.run([sys.executable, "-c", "from tests.support.comfy_runtime import tiny_models_dir as t; print(t())"],
                   cwd=REPO, env=env, check=True)   # the tiny models, built on this machine
    runs = [run_tests(env, *run, logs) for run in RUNS]
    decoder = run_decoder_bench(env, logs)
    summary = {"device": device, "torch": torch.__version__,
               "passed": sum(r["passed"] for r in runs), "failed": sum(r["failed"] + r["errors"] for r in runs),
               **{f"{r['name']}_passed": r["passed"] for r in runs},
               **{f"{r['name']}_failed": r["failed"] + r["errors"] for r in runs},
               "decoder": decoder["summary"], "seconds": round(time.time() - start, 1)}
    out = {"summary": summary, "runs": runs, "decoder_bench": decoder,
           "machine": {"device": device, "python": platform.python_version(), "cpu_count": os.cpu_count()}}
    target = REPO / "bench" / "results" / "gpu_check.json"
    target.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    if os.environ.get("OUT"):
        shutil.copy(target, os.environ["OUT"])
        for log in logs.iterdir():
            if log.suffix == ".log":
                shutil.copy(log, os.environ["OUT"])


if __name__ == "__main__":
    main()
