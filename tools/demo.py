"""`make demo`: run every shipped example workflow on a headless ComfyUI and report what it did.

The workflows are queued unchanged through the HTTP API (converted with tools.workflow_api.ui_to_api),
with the users' checkpoint names mapped onto the tiny models trained on the emoji set (models/README.md,
tests/support/tiny_models.py) and the example image at 128 px, the size they were trained at.
Images go to demo_output/; one table is printed: workflow, method, reconstruction NMSE/PSNR against
the input, the inversion's model calls as the nodes report them, and seconds.

    $COMFY_PYTHON tools/demo.py [--size 128] [--thumbnails]   # --thumbnails also writes example_workflows/*.jpg
"""
import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from tests.support.comfy_runtime import ComfyServer, tiny_models_dir  # noqa: E402
from tests.support.tiny_models import USER_MODEL_ALIASES  # noqa: E402
from tools.workflow_api import apply_overrides, tiny_overrides, ui_to_api  # noqa: E402

WORKFLOW_DIR = REPO / "example_workflows"
INPUT_IMAGE = WORKFLOW_DIR / "input" / "exact_inversion_cat_face.png"
OUT_DIR = REPO / "demo_output"
# ComfyUI runs text encoders in fp16 on a CPU, which is about 5x slower there than fp32
SERVER_ARGS = ("--fp32-text-enc",)
# One torch thread: on a shared 2-core machine two threads per process made the tiny UNet's calls
# about 8x slower (measured 411 ms vs 70 ms per batch-2 call at 4x4 latents) than one.
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY_LABEL = "tiny models trained on 20 emoji captions (make demo; models/README.md)"


def workflow_paths():
    return sorted(WORKFLOW_DIR.glob("*.json"))


def install_input_image(base, size):
    """The example image under its own name in the server's input/, downscaled to size x size."""
    image = Image.open(INPUT_IMAGE).convert("RGB").resize((size, size), Image.LANCZOS)
    (Path(base) / "input").mkdir(parents=True, exist_ok=True)
    image.save(Path(base) / "input" / INPUT_IMAGE.name)
    # compare against exactly what LoadImage reads
    return np.asarray(Image.open(Path(base) / "input" / INPUT_IMAGE.name).convert("RGB"), dtype=np.float64) / 255


def nmse_psnr(image, reference):
    """(NMSE dB, PSNR dB) of an image in [0, 1] against the reference."""
    err = np.sum((image - reference) ** 2)
    nmse = 10 * np.log10(max(err, 1e-30) / max(np.sum(reference ** 2), 1e-30))
    psnr = 10 * np.log10(1.0 / max(err / reference.size, 1e-30))
    return float(nmse), float(psnr)


def saved_images(server, entry):
    """[(SaveImage filename_prefix, path)] of the images a finished prompt saved."""
    found = []
    for node_id, output in entry.get("outputs", {}).items():
        for item in output.get("images", []):
            if item.get("type") != "output":
                continue
            path = server.base / "output" / item.get("subfolder", "") / item["filename"]
            found.append((f"{item.get('subfolder', '')}/{item['filename']}", path))
    return found


def reported_model_calls(entry):
    """Diffusion-model calls that the pack's nodes report in their ui (None if none reports any)."""
    total, any_reported = 0, False
    for output in entry.get("outputs", {}).values():
        for key in ("model_calls", "model_calls_forward", "model_calls_backward"):
            for value in output.get(key, []):
                total += int(value)
                any_reported = True
        if not any(k in output for k in ("model_calls", "model_calls_forward")):
            for record in output.get("inversion_convergence", []):
                match = re.search(r"(\d+) model calls", record.get("summary", ""))
                if match:
                    total += int(match.group(1))
                    any_reported = True
    return total if any_reported else None


def run_workflow(server, path, reference):
    """Queue one UI workflow; return a row for the table and the images it saved."""
    workflow = json.loads(path.read_text())
    prompt = apply_overrides(ui_to_api(workflow, server.object_info()), tiny_overrides(reference.shape[0]))
    start = time.perf_counter()
    prompt_id = server.queue(prompt)
    entry = server.wait(prompt_id, timeout=600)
    seconds = time.perf_counter() - start
    status = entry["status"]["status_str"]
    row = {"workflow": path.stem, "status": status, "seconds": seconds,
           "model_calls": reported_model_calls(entry), "images": []}
    if status != "success":
        errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        row["error"] = (errors[0].get("node_type", "") + ": " + errors[0].get("exception_message", "").strip()
                        if errors else "failed")
        return row
    for name, image_path in saved_images(server, entry):
        pixels = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float64) / 255
        nmse, psnr = nmse_psnr(pixels, reference)
        row["images"].append({"name": name, "path": image_path, "nmse_db": nmse, "psnr_db": psnr,
                              "kind": output_kind(name), "pixels": pixels})
    vae_only = [im for im in row["images"] if im["kind"] == "VAE only"]
    for im in row["images"]:   # how far the diffusion round trip is from the VAE's own decode
        if im["kind"] == "reconstruction" and vae_only:
            im["vs_vae_only_psnr_db"] = nmse_psnr(im["pixels"], vae_only[0]["pixels"])[1]
    for im in row["images"]:
        del im["pixels"]
    return row


def output_kind(name):
    """What a saved image is, from its SaveImage filename_prefix."""
    if "vae_only" in name:
        return "VAE only"
    if "generated" in name:
        return "generated"
    return "reconstruction" if "reconstruction" in name else "edit"


def method_of(workflow):
    types = {n["type"] for n in workflow["nodes"]}
    if "TreeRingNoise" in types or "TreeRingDetect" in types:
        return "Tree-Ring watermark" + (" (detect)" if "TreeRingDetect" in types else " (generate)")
    if "RFInversionEdit" in types:
        return "RF-Inversion Edit (one node)"
    if "FlowEdit" in types:
        return "FlowEdit (inversion-free edit)"
    if "RFForwardSampler" in types:
        return "RF-Inversion (forward/reverse samplers)"
    if "PreciseInvInvertLatent" in types or "PreciseInvSampler" in types:
        return "PreciseInv"
    if "ReversibleSampler" in types:
        return "Reversible Sampler: generate, invert, edit"
    for node in workflow["nodes"]:
        if node["type"] == "InvertLatent":
            edit = sum(n["type"] == "KSamplerAdvanced" for n in workflow["nodes"]) > 1
            return "exact inversion" + (" + prompt edit" if edit else "")
    return "other"


def thumbnail(reference, row, title, scale=3):
    """input | outputs, upscaled with nearest neighbour, labelled as the tiny models' output."""
    tiles = [("input", reference)] + [
        (im["kind"], np.asarray(Image.open(im["path"]).convert("RGB"), dtype=np.float64) / 255)
        for im in row["images"]]
    size = reference.shape[0] * scale
    pad, header, footer = 8, 24, 34
    canvas = Image.new("RGB", (pad + len(tiles) * (size + pad), header + size + footer), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), title, fill=(230, 230, 230))
    for i, (label, pixels) in enumerate(tiles):
        tile = Image.fromarray((pixels * 255).round().astype(np.uint8)).resize((size, size), Image.NEAREST)
        x = pad + i * (size + pad)
        canvas.paste(tile, (x, header))
        draw.text((x, header + size + 4), label, fill=(200, 200, 200))
    draw.text((pad, header + size + 18), TINY_LABEL, fill=(255, 190, 90))
    return canvas


def models_line(models_dir):
    """Which files the users' names resolved to, with their parameter counts (read from the files)."""
    from safetensors import safe_open
    parts = []
    for alias, target in USER_MODEL_ALIASES.items():
        if not alias.startswith("checkpoints/"):
            continue
        counts = {"diffusion": 0, "text encoder": 0, "VAE": 0}
        with safe_open(str(Path(models_dir) / target), "pt") as f:
            for key in f.keys():
                n = int(np.prod(f.get_slice(key).get_shape()))
                if key.startswith("model.diffusion_model."):
                    counts["diffusion"] += n
                elif key.startswith(("cond_stage_model.", "text_encoders.")):
                    counts["text encoder"] += n
                elif key.startswith("first_stage_model."):
                    counts["VAE"] += n
        sizes = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items())
        parts.append(f"{Path(alias).name} -> {Path(target).name} ({sizes} params)")
    return "Models used: the tiny trained models (models/README.md): " + "; ".join(parts)


def format_table(rows):
    header = "| workflow | method | reconstruction NMSE / PSNR vs input | reconstruction vs VAE-only decode | " \
             "other outputs: PSNR vs input | inversion model calls (node-reported) | seconds |"
    lines = [header, "|" + "---|" * 7]
    for row in rows:
        if row["status"] != "success":
            lines.append(f"| {row['workflow']} | {row['method']} | FAILED: {row.get('error', '')} | | | | "
                         f"{row['seconds']:.1f} |")
            continue
        recon = [im for im in row["images"] if im["kind"] == "reconstruction"]
        recon_text = ", ".join(f"{im['nmse_db']:.1f} dB / {im['psnr_db']:.1f} dB" for im in recon) or "-"
        vs_vae = ", ".join(f"PSNR {im['vs_vae_only_psnr_db']:.1f} dB" for im in recon
                           if "vs_vae_only_psnr_db" in im) or "-"
        other = ", ".join(f"{im['kind']} {im['psnr_db']:.1f} dB" for im in row["images"]
                          if im["kind"] != "reconstruction") or "-"
        calls = "not reported" if row["model_calls"] is None else str(row["model_calls"])
        lines.append(f"| {row['workflow']} | {row['method']} | {recon_text} | {vs_vae} | {other} | {calls} | "
                     f"{row['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="side of the input image the demo runs on")
    parser.add_argument("--thumbnails", action="store_true", help="also write example_workflows/<name>.jpg")
    parser.add_argument("--only", default="", help="run only workflows whose name contains this")
    args = parser.parse_args(argv)
    paths = [p for p in workflow_paths() if args.only in p.stem]
    if not paths:
        sys.exit("no example workflows in example_workflows/")
    models_dir = tiny_models_dir()
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ei_demo_") as base:
        server = ComfyServer(base, extra_args=SERVER_ARGS, test_nodes=False, env=SERVER_ENV)   # as users install the pack
        reference = install_input_image(server.base, args.size)
        Image.fromarray((reference * 255).round().astype(np.uint8)).save(OUT_DIR / "input.png")
        with server:
            for path in paths:
                print(f"running {path.name} ...", flush=True)
                row = run_workflow(server, path, reference)
                row["method"] = method_of(json.loads(path.read_text()))
                for i, im in enumerate(row["images"]):
                    dest = OUT_DIR / f"{path.stem}_{im['kind'].replace(' ', '_')}_{i}.png"
                    shutil.copyfile(im["path"], dest)
                    im["path"] = dest
                if row["status"] == "success":
                    thumb = thumbnail(reference, row, f"{path.stem} ({row['method']})")
                    thumb.save(OUT_DIR / f"{path.stem}.jpg", quality=92)
                    if args.thumbnails:
                        thumb.save(WORKFLOW_DIR / f"{path.stem}.jpg", quality=92)
                rows.append(row)
                shutil.copyfile(server.log_path, OUT_DIR / "server.log")
                print(f"  {row['status']} in {row['seconds']:.1f} s, model calls: {row['model_calls']}", flush=True)
    print()
    print(f"Input: {INPUT_IMAGE.relative_to(REPO)} resized to {args.size}x{args.size}; images in "
          f"{OUT_DIR.relative_to(REPO)}/")
    print(format_table(rows))
    print(models_line(models_dir))
    summary = [{k: (str(v) if isinstance(v, Path) else v) for k, v in row.items() if k != "images"}
               | {"images": [{k: str(v) if isinstance(v, Path) else v for k, v in im.items()} for im in row["images"]]}
               for row in rows]
    (OUT_DIR / "summary.json").write_text(json.dumps(summary, indent=2))
    if any(row["status"] != "success" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
