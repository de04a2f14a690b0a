"""`make bench SUITE=models.flux2 [QUICK=1]`: how well the trained tiny FLUX.2-layout model draws its captions, in
ComfyUI 0.33 (bench/models.py's protocol and classifier).

  generator  tiny_flux2_trained by UNETLoader, the tiny CLIP-L by CLIPLoader (CLIPTextEncode + FluxGuidance 4),
             taef2 by VAELoader; KSampler euler / simple, 20 steps, 256x256 (16x16 packed 128-channel latents),
             at cfg 5 with an empty negative (the other tiny models' protocol) and at cfg 1 (FLUX.2's recipe);
             the random-weight file the same way (one sample per caption) as a baseline; one batch, seed 1000
  classifier bench/models.train_classifier on the 20 real images (never on generated ones); samples are judged
             at 64 px like the other models'
Writes bench/results/models_flux2.json and a grid (real image, then samples, per caption).
"""
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.common import markdown_table, result_path, write_results
from bench.models import save_grid, train_classifier
from tools.train_models import EVAL_CAPTIONS, load_emoji

SAMPLER, SCHEDULER, STEPS, SIZE = "euler", "simple", 20, 256
SETTINGS = {"trained_cfg5": (True, 5.0), "trained_cfg1": (True, 1.0), "random_cfg5": (False, 5.0)}
BASELINE_PER_CAPTION = 1     # the random-weight baseline: one sample per caption


def generate(nodes, trained, cfg, per_caption):
    """(20, n, 3, SIZE, SIZE) samples: one KSampler batch, caption i on samples i*n..(i+1)*n-1, seed 1000."""
    from tests.support.flux2 import flux2_conditioning, load_flux2
    model, clip, vae = load_flux2(trained=trained)
    conds = [flux2_conditioning(clip, c) for c in EVAL_CAPTIONS]
    positive = [[torch.cat([c[0][0] for c in conds]).repeat_interleave(per_caption, 0), dict(conds[0][0][1])]]
    latent = {"samples": torch.zeros(len(EVAL_CAPTIONS) * per_caption, 128, SIZE // 16, SIZE // 16)}
    out = nodes.common_ksampler(model, 1000, STEPS, cfg, SAMPLER, SCHEDULER, positive,
                                flux2_conditioning(clip, ""), latent)[0]
    return vae.decode(out["samples"]).movedim(-1, 1).float().unflatten(0, (len(EVAL_CAPTIONS), per_caption))


def main(quick):
    from tests.support.comfy_runtime import InProcessComfy
    from tests.support.flux2 import flux2_missing_reason
    torch.set_num_threads(1)
    _, captions, pixels = load_emoji()
    real128 = pixels[[captions.index(c) for c in EVAL_CAPTIONS]].float() / 255
    classifier, fresh, _ = train_classifier(F.interpolate(real128, size=(64, 64), mode="area"), quick)
    rows, summary = [], {"classifier_fresh_augment_accuracy": round(fresh, 3), "chance_accuracy": 0.05}
    per_caption = 2 if quick else 5
    with tempfile.TemporaryDirectory() as base:
        runtime = InProcessComfy(base)
        if flux2_missing_reason():
            print(f"skipped: {flux2_missing_reason()}")
            return {}
        for name, (trained, cfg) in SETTINGS.items():
            start = time.time()
            n = per_caption if trained else BASELINE_PER_CAPTION
            with torch.inference_mode():
                samples = generate(runtime.nodes, trained, cfg, n)
                predicted = classifier(F.interpolate(samples.flatten(0, 1), size=(64, 64), mode="area")).argmax(1)
            hits = (predicted.view(20, n) == torch.arange(20)[:, None]).float()
            rows += [dict(model=name, caption=c, samples=n, accuracy=round(h.mean().item(), 3))
                     for c, h in zip(EVAL_CAPTIONS, hits)]
            summary[f"flux2_{name}_class_accuracy"] = round(hits.mean().item(), 3)
            summary[f"flux2_{name}_seconds"] = round(time.time() - start, 1)
            print(f"{name}: class accuracy {hits.mean().item():.3f} over {hits.numel()} samples", flush=True)
            save_grid(result_path(f"models_flux2_{name}", "png", quick), EVAL_CAPTIONS,
                      F.interpolate(real128, size=(SIZE, SIZE), mode="nearest"), samples[:, :4].cpu(),
                      f"tiny FLUX.2 ({name}): {SAMPLER} {STEPS} steps, {SIZE} px, seed 1000, one batch")
    summary["flux2_class_accuracy"] = summary["flux2_trained_cfg5_class_accuracy"]
    notes = (f"CPU float32, ComfyUI 0.33; the trained tiny FLUX.2-layout model + taef2 against its random-weight "
             f"start; {SAMPLER}/{SCHEDULER} {STEPS} steps, FluxGuidance 4, {SIZE} px, {per_caption} samples per caption")
    print(markdown_table([dict(key=k, value=v) for k, v in summary.items()], ["key", "value"]))
    return write_results("models_flux2", rows, summary, quick, notes)
