"""Write example_workflows/*.json (ComfyUI's UI format) from the short specs below.

Widget order, defaults, slot types and link ids come from a real ComfyUI's /object_info, so the
files stay consistent with the nodes' schemas: re-run this after a node's inputs change.

    $COMFY_PYTHON tools/make_workflows.py            # all workflows whose nodes are installed
    $COMFY_PYTHON tools/make_workflows.py --check    # fail if a committed file is out of date

Each workflow loads models by the names users have (v1-5-pruned-emaonly.safetensors,
sd3.5_medium.safetensors) and the image `exact_inversion_cat_face.png` (example_workflows/input/: the
"cat face" emoji of Noto Color Emoji, SIL OFL), with the captions the tiny trained models know as prompts.
"""
import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tools.workflow_api import is_widget, ordered_inputs  # noqa: E402

OUT_DIR = REPO / "example_workflows"
INPUT_IMAGE = "exact_inversion_cat_face.png"
SD15 = "v1-5-pruned-emaonly.safetensors"
SD3 = "sd3.5_medium.safetensors"
SOURCE_PROMPT = "cat face"
TARGET_PROMPT = "dog face"
NEGATIVE_PROMPT = ""

GROUP_COLORS = {"input": "#3f789e", "invert": "#8A8", "output": "#b06634", "edit": "#a1309b"}
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}


class Node:
    def __init__(self, wf, node_id, class_type):
        self.wf, self.id, self.class_type = wf, node_id, class_type

    def __getitem__(self, slot):
        return (self, slot)


def _default(name, spec):
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options")
    if choices:
        return choices[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec[0])


def _has_control_widget(name, spec):
    """What the frontend does: a control widget after an INT when control_after_generate says so
    (absent means: only for inputs named seed / noise_seed)."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    flag = options.get("control_after_generate")
    if flag is None:
        return spec[0] == "INT" and name in ("seed", "noise_seed")
    return bool(flag)


class Workflow:
    """A UI-format workflow built from (class_type, inputs by name) against /object_info."""

    def __init__(self, object_info, name):
        self.info, self.name = object_info, name
        self.nodes, self.links, self.groups = [], [], []
        self.next_id, self.next_link = 1, 1

    def node(self, class_type, pos, title=None, width=300, extra_height=0, **inputs):
        if class_type not in self.info:
            raise KeyError(class_type)
        schema = self.info[class_type]
        node = Node(self, self.next_id, class_type)
        self.next_id += 1
        slots, widgets_values, widget_count, link_slots = [], [], 0, 0
        unknown = set(inputs) - {name for name, _, _ in ordered_inputs(schema)}
        if unknown:
            raise ValueError(f"{class_type} has no input(s) {sorted(unknown)}")
        for name, spec, required in ordered_inputs(schema):
            value = inputs.get(name)
            linked = isinstance(value, (tuple, Node))
            if is_widget(spec):
                widget_count += 1
                widgets_values.append(_default(name, spec) if value is None or linked else value)
                if _has_control_widget(name, spec):
                    widgets_values.append("fixed")
                if spec[1:] and isinstance(spec[1], dict) and spec[1].get("image_upload"):
                    widgets_values.append("image")
                if linked:   # a widget driven by a link: the frontend keeps the widget's slot
                    slots.append({"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0],
                                  "widget": {"name": name}, "link": self._link(value, node, len(slots), spec)})
                continue
            link_slots += 1
            if value is None:
                if required:
                    raise ValueError(f"{class_type}: required input {name!r} is not connected")
                slots.append({"name": name, "type": spec[0], "shape": 7, "link": None})
                continue
            slots.append({"name": name, "type": spec[0], "link": self._link(value, node, len(slots), spec)})
        outputs = [{"name": out_name, "type": out_type if isinstance(out_type, str) else "COMBO", "links": [],
                    "slot_index": i}
                   for i, (out_type, out_name) in enumerate(zip(schema["output"], schema["output_name"]))]
        height = 46 + 22 * max(link_slots, len(outputs)) + 26 * widget_count + extra_height
        record = {"id": node.id, "type": class_type, "pos": list(pos), "size": [width, height], "flags": {},
                  "order": len(self.nodes), "mode": 0, "inputs": slots, "outputs": outputs,
                  "properties": {"Node name for S&R": class_type}, "widgets_values": widgets_values}
        if title:
            record["title"] = title
        node.record = record
        self.nodes.append(node)
        return node

    def _link(self, value, target, target_slot, spec):
        source, slot = (value, 0) if isinstance(value, Node) else value
        link_id = self.next_link
        self.next_link += 1
        out_type = self.info[source.class_type]["output"][slot]
        self.links.append([link_id, source.id, slot, target.id, target_slot, out_type])
        source.record["outputs"][slot]["links"].append(link_id)
        return link_id

    def note(self, text, pos, width=380, height=200):
        node = Node(self, self.next_id, "MarkdownNote")
        self.next_id += 1
        node.record = {"id": node.id, "type": "MarkdownNote", "pos": list(pos), "size": [width, height],
                       "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                       "properties": {}, "widgets_values": [text], **NOTE_COLORS}
        self.nodes.append(node)
        return node

    def group(self, title, nodes, color, pad=20):
        xs = [n.record["pos"][0] for n in nodes]
        ys = [n.record["pos"][1] for n in nodes]
        x1 = [n.record["pos"][0] + n.record["size"][0] for n in nodes]
        y1 = [n.record["pos"][1] + n.record["size"][1] for n in nodes]
        top = 40   # room for the group's title bar and the nodes' own title bars
        self.groups.append({"id": len(self.groups) + 1, "title": title, "color": color, "font_size": 22,
                            "flags": {}, "bounding": [min(xs) - pad, min(ys) - pad - top,
                                                      max(x1) - min(xs) + 2 * pad, max(y1) - min(ys) + 2 * pad + top]})

    def to_json(self):
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"exact-inversion/{self.name}")), "revision": 0,
                "last_node_id": self.next_id - 1, "last_link_id": self.next_link - 1,
                "nodes": [n.record for n in self.nodes], "links": self.links, "groups": self.groups,
                "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [80, 150]}}, "version": 0.4}


# ---------------------------------------------------------------------------------------------
# The workflows. Coordinates: columns 340 px apart; rows as needed.

COL = [0, 360, 720, 1080, 1440, 1800]


def _load_sd15(wf, y=0):
    ckpt = wf.node("CheckpointLoaderSimple", (COL[0], y), ckpt_name=SD15)
    image = wf.node("LoadImage", (COL[0], y + 200), extra_height=290, image=INPUT_IMAGE)
    return ckpt, image


def reconstruction(wf):
    """1. Exact reconstruction: Decoder Inversion -> Invert Latent (exact) -> KSampler (Advanced,
    add_noise off) -> VAE Decode, on an EPS (SD1.5) model."""
    steps, cfg, sampler, scheduler = 20, 1.0, "euler", "normal"
    ckpt, image = _load_sd15(wf)
    pos = wf.node("CLIPTextEncode", (COL[1], 0), title="Prompt (the image as it is)", extra_height=40,
                  clip=ckpt[1], text=SOURCE_PROMPT)
    neg = wf.node("CLIPTextEncode", (COL[1], 220), title="Negative", extra_height=40, clip=ckpt[1], text="")
    enc = wf.node("DecoderInversion", (COL[1], 440), vae=ckpt[2], image=image[0])
    inv = wf.node("InvertLatent", (COL[2], 0), model=ckpt[0], positive=pos[0], negative=neg[0], latent=enc[0],
                  sampler_name=sampler, scheduler=scheduler, steps=steps, cfg=cfg, method="exact")
    regen = wf.node("KSamplerAdvanced", (COL[3], 0), title="KSampler (Advanced): add_noise disabled",
                    model=ckpt[0], positive=pos[0], negative=neg[0], latent_image=inv[0], add_noise="disable",
                    noise_seed=0, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler)
    dec = wf.node("VAEDecode", (COL[4], 0), samples=regen[0], vae=ckpt[2])
    save = wf.node("SaveImage", (COL[4], 120), extra_height=260, images=dec[0],
                   filename_prefix="exact_inversion/reconstruction")
    vae_only = wf.node("VAEDecode", (COL[3], 560), title="VAE Decode (the VAE's own limit)", samples=enc[0],
                       vae=ckpt[2])
    save_vae = wf.node("SaveImage", (COL[3], 680), extra_height=260, images=vae_only[0],
                       filename_prefix="exact_inversion/vae_only")
    wf.group("1. Image -> latent (exact VAE encode)", [ckpt, image, enc], GROUP_COLORS["input"])
    wf.group("2. Latent -> noise (exact inversion)", [pos, neg, inv], GROUP_COLORS["invert"])
    wf.group("3. Noise -> the same image", [regen, dec, save], GROUP_COLORS["output"])
    wf.group("Compare: the latent decoded directly", [vae_only, save_vae], GROUP_COLORS["input"])
    wf.note(
        "## Exact reconstruction\n"
        "Decoder Inversion encodes the image so that the VAE decodes it back; Invert Latent finds the noise "
        "from which **the same** sampler, scheduler, steps, cfg and prompts regenerate that latent.\n\n"
        "Regenerate with KSampler (Advanced), **add_noise disabled**, the same settings "
        f"({sampler}, {scheduler}, {steps} steps, cfg {cfg}).\n\n"
        "Invertible samplers: euler, ddim, dpmpp_2m.\n\n"
        "Compare the two saved images: if the inversion is exact, the reconstruction matches the VAE-only "
        "decode (the VAE's own limit), whatever the model.", (COL[2], 520), width=340, height=320)
    return "exact (backward Euler)"


def prompt_edit(wf):
    """2. Prompt editing with exact inversion on an EPS model: invert with the source prompt,
    regenerate with the target prompt (and with the source prompt, to compare)."""
    steps, cfg, sampler, scheduler = 20, 3.0, "ddim", "ddim_uniform"
    ckpt, image = _load_sd15(wf)
    enc = wf.node("DecoderInversion", (COL[1], 440), vae=ckpt[2], image=image[0])
    src = wf.node("CLIPTextEncode", (COL[1], 0), title="Source prompt (the image as it is)", extra_height=40,
                  clip=ckpt[1], text=SOURCE_PROMPT)
    neg = wf.node("CLIPTextEncode", (COL[1], 220), title="Negative", extra_height=40, clip=ckpt[1],
                  text=NEGATIVE_PROMPT)
    tgt = wf.node("CLIPTextEncode", (COL[3], 520), title="Target prompt (the edit)", extra_height=40,
                  clip=ckpt[1], text=TARGET_PROMPT)
    inv = wf.node("InvertLatent", (COL[2], 0), model=ckpt[0], positive=src[0], negative=neg[0], latent=enc[0],
                  sampler_name=sampler, scheduler=scheduler, steps=steps, cfg=cfg, method="exact")
    common = dict(model=ckpt[0], negative=neg[0], latent_image=inv[0], add_noise="disable", noise_seed=0,
                  steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler)
    recon = wf.node("KSamplerAdvanced", (COL[3], 0), title="Regenerate with the source prompt",
                    positive=src[0], **common)
    edit = wf.node("KSamplerAdvanced", (COL[3], 740), title="Regenerate with the target prompt",
                   positive=tgt[0], **common)
    dec_r = wf.node("VAEDecode", (COL[4], 0), samples=recon[0], vae=ckpt[2])
    save_r = wf.node("SaveImage", (COL[4], 120), extra_height=260, images=dec_r[0],
                     filename_prefix="exact_inversion/edit_reconstruction")
    dec_e = wf.node("VAEDecode", (COL[4], 740), samples=edit[0], vae=ckpt[2])
    save_e = wf.node("SaveImage", (COL[4], 860), extra_height=260, images=dec_e[0],
                     filename_prefix="exact_inversion/edit")
    wf.group("1. Image -> noise with the source prompt", [ckpt, image, enc, src, neg, inv], GROUP_COLORS["invert"])
    wf.group("2a. Same prompt: the original back", [recon, dec_r, save_r], GROUP_COLORS["output"])
    wf.group("2b. Target prompt: the edit", [tgt, edit, dec_e, save_e], GROUP_COLORS["edit"])
    wf.note(
        "## Prompt editing (EPS models: SD1.5, SDXL)\n"
        "Invert with the **source** prompt, then regenerate from the inverted noise with the **target** "
        "prompt. Everything else stays as at inversion: sampler, scheduler, steps, cfg, negative, "
        "add_noise disabled.\n\n"
        "The upper branch regenerates with the source prompt: it gives the original back, which shows "
        "the inversion is exact. No visible edit? Raise cfg (at inversion and regeneration alike).",
        (COL[2], 520), width=340, height=300)
    return "exact (backward Euler) + edit"


def preciseinv_few_step(wf):
    """3. Few-step inversion with PreciseInv (placeholder until its nodes are in object_info)."""
    steps, cfg, sampler, scheduler = 4, 1.0, "euler", "simple"
    ckpt, image = _load_sd15(wf)
    pos = wf.node("CLIPTextEncode", (COL[1], 0), title="Prompt (the image as it is)", extra_height=40,
                  clip=ckpt[1], text=SOURCE_PROMPT)
    neg = wf.node("CLIPTextEncode", (COL[1], 220), title="Negative", extra_height=40, clip=ckpt[1], text="")
    enc = wf.node("DecoderInversion", (COL[1], 440), vae=ckpt[2], image=image[0])
    inv = wf.node("PreciseInvInvertLatent", (COL[2], 0), model=ckpt[0], positive=pos[0], negative=neg[0],
                  latent=enc[0], sampler_name=sampler, scheduler=scheduler, steps=steps, cfg=cfg)
    regen = wf.node("KSamplerAdvanced", (COL[3], 0), title="KSampler (Advanced): add_noise disabled",
                    model=ckpt[0], positive=pos[0], negative=neg[0], latent_image=inv[0], add_noise="disable",
                    noise_seed=0, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler)
    dec = wf.node("VAEDecode", (COL[4], 0), samples=regen[0], vae=ckpt[2])
    save = wf.node("SaveImage", (COL[4], 120), extra_height=260, images=dec[0],
                   filename_prefix="exact_inversion/preciseinv_reconstruction")
    wf.group("1. Image -> latent", [ckpt, image, enc], GROUP_COLORS["input"])
    wf.group("2. Few-step inversion (PreciseInv)", [pos, neg, inv], GROUP_COLORS["invert"])
    wf.group("3. Regenerate", [regen, dec, save], GROUP_COLORS["output"])
    wf.note(
        "## Few-step inversion with PreciseInv\n"
        f"For few-step sampling ({steps} steps here): each step's latent is found by optimisation so that "
        f"euler/ddim maps it onto the next one. Regenerate with {sampler}, the same scheduler, steps and cfg, "
        "add_noise disabled.", (COL[2], 520), width=340, height=220)
    return "PreciseInv"


def _load_sd3(wf):
    ckpt = wf.node("CheckpointLoaderSimple", (COL[0], 0), ckpt_name=SD3)
    image = wf.node("LoadImage", (COL[0], 200), extra_height=290, image=INPUT_IMAGE)
    enc = wf.node("VAEEncode", (COL[0], 720), pixels=image[0], vae=ckpt[2])
    return ckpt, image, enc


def rf_inversion_samplers(wf):
    """4. RF-Inversion editing on a flow model with SamplerCustomAdvanced and the forward / reverse samplers."""
    steps, scheduler = 28, "simple"
    ckpt, image, enc = _load_sd3(wf)
    src = wf.node("CLIPTextEncode", (COL[1], 0), title="Source prompt (the image as it is)", extra_height=40,
                  clip=ckpt[1], text=SOURCE_PROMPT)
    tgt = wf.node("CLIPTextEncode", (COL[1], 620), title="Target prompt (the edit)", extra_height=40,
                  clip=ckpt[1], text=TARGET_PROMPT)
    up = wf.node("InversionSigmas", (COL[1], 220), model=ckpt[0], scheduler=scheduler, steps=steps)
    fwd = wf.node("RFForwardSampler", (COL[1], 400))
    noise_off = wf.node("DisableNoise", (COL[2], 0))
    guide_src = wf.node("BasicGuider", (COL[2], 100), model=ckpt[0], conditioning=src[0])
    invert = wf.node("SamplerCustomAdvanced", (COL[2], 230), title="Invert (image -> structured noise)",
                     noise=noise_off[0], guider=guide_src[0], sampler=fwd[0], sigmas=up[0], latent_image=enc[0])
    down = wf.node("BasicScheduler", (COL[3], 0), model=ckpt[0], scheduler=scheduler, steps=steps, denoise=1.0)
    rev = wf.node("RFReverseSampler", (COL[3], 180), reference=enc[0])
    guide_tgt = wf.node("BasicGuider", (COL[3], 440), model=ckpt[0], conditioning=tgt[0])
    edit = wf.node("SamplerCustomAdvanced", (COL[4], 0), title="Edit (noise -> image, target prompt)",
                   noise=noise_off[0], guider=guide_tgt[0], sampler=rev[0], sigmas=down[0], latent_image=invert[0])
    dec = wf.node("VAEDecode", (COL[5], 0), samples=edit[0], vae=ckpt[2])
    save = wf.node("SaveImage", (COL[5], 120), extra_height=260, images=dec[0],
                   filename_prefix="exact_inversion/rf_edit")
    wf.group("1. Image -> latent", [ckpt, image, enc], GROUP_COLORS["input"])
    wf.group("2. Controlled forward flow (invert, source prompt, cfg 1)", [src, up, fwd, noise_off, guide_src, invert],
             GROUP_COLORS["invert"])
    wf.group("3. Controlled reverse flow (edit, target prompt)", [tgt, down, rev, guide_tgt, edit, dec, save],
             GROUP_COLORS["edit"])
    wf.note(
        "## RF-Inversion (flow models: SD3, Flux)\n"
        "Forward: Inversion Sigmas (ascending) + RF Forward Sampler, source prompt at cfg 1, no added noise. "
        "Reverse: BasicScheduler with the **same scheduler and steps** + RF Reverse Sampler with the source "
        "latent as reference, target prompt, no added noise.\n\n"
        "gamma (forward): higher = more editable, less faithful. eta / stop (reverse): higher eta or a later "
        "stop keeps more of the source.", (COL[2], 560), width=340, height=300)
    return "RF-Inversion (samplers)"


def rf_inversion_one_node(wf):
    """5. The same edit with the one-node RF-Inversion Edit."""
    ckpt, image, enc = _load_sd3(wf)
    src = wf.node("CLIPTextEncode", (COL[1], 0), title="Source prompt (the image as it is)", extra_height=40,
                  clip=ckpt[1], text=SOURCE_PROMPT)
    tgt = wf.node("CLIPTextEncode", (COL[1], 220), title="Target prompt (the edit)", extra_height=40,
                  clip=ckpt[1], text=TARGET_PROMPT)
    edit = wf.node("RFInversionEdit", (COL[2], 0), width=320, model=ckpt[0], source=src[0], target=tgt[0],
                   latent=enc[0])
    dec = wf.node("VAEDecode", (COL[3], 0), samples=edit[0], vae=ckpt[2])
    save = wf.node("SaveImage", (COL[3], 120), extra_height=260, images=dec[0],
                   filename_prefix="exact_inversion/rf_edit_one_node")
    wf.group("1. Image -> latent", [ckpt, image, enc], GROUP_COLORS["input"])
    wf.group("2. RF-Inversion Edit (invert + controlled edit in one node)", [src, tgt, edit], GROUP_COLORS["edit"])
    wf.group("3. Output", [dec, save], GROUP_COLORS["output"])
    wf.note(
        "## RF-Inversion Edit (one node)\n"
        "The same as the SamplerCustomAdvanced version: invert with the source prompt at cfg 1, then edit with "
        "the target prompt. For SD3 you may set cfg 3-5 and connect a negative; Flux keeps cfg 1.",
        (COL[2], 560), width=320, height=200)
    return "RF-Inversion (one node)"


def _edit_prompts(wf, ckpt):
    src = wf.node("CLIPTextEncode", (COL[1], 0), title="Source prompt (the image as it is)", extra_height=40,
                  clip=ckpt[1], text=SOURCE_PROMPT)
    tgt = wf.node("CLIPTextEncode", (COL[1], 220), title="Target prompt (the edit)", extra_height=40,
                  clip=ckpt[1], text=TARGET_PROMPT)
    return src, tgt


def _object_mask(wf, image, y):
    """A MASK of the image's size, 1 on the emoji (blue is low there, 1 on the white background)."""
    blue = wf.node("ImageToMask", (COL[1], y), image=image[0], channel="blue")
    inverted = wf.node("InvertMask", (COL[1], y + 110), mask=blue[0])
    return [blue, inverted, wf.node("ThresholdMask", (COL[1], y + 200), mask=inverted[0], value=0.2)]


def rf_inversion_masked(wf):
    """6. A masked (regional) RF-Inversion edit: Set Latent Noise Mask confines the edit to the emoji."""
    ckpt, image, enc = _load_sd3(wf)
    src, tgt = _edit_prompts(wf, ckpt)
    mask = _object_mask(wf, image, 440)
    masked = wf.node("SetLatentNoiseMask", (COL[2], 440), samples=enc[0], mask=mask[-1][0])
    edit = wf.node("RFInversionEdit", (COL[2], 0), width=320, model=ckpt[0], source=src[0], target=tgt[0],
                   latent=masked[0])
    dec = wf.node("VAEDecode", (COL[3], 0), samples=edit[0], vae=ckpt[2])
    save = wf.node("SaveImage", (COL[3], 120), extra_height=260, images=dec[0],
                   filename_prefix="exact_inversion/rf_edit_masked")
    wf.group("1. Image -> latent", [ckpt, image, enc], GROUP_COLORS["input"])
    wf.group("2. Mask: where the edit may change the image", [*mask, masked], GROUP_COLORS["invert"])
    wf.group("3. RF-Inversion Edit inside the mask", [src, tgt, edit], GROUP_COLORS["edit"])
    wf.group("4. Output", [dec, save], GROUP_COLORS["output"])
    wf.note(
        "## Masked RF-Inversion Edit\n"
        "Set Latent Noise Mask confines the edit (here to the emoji, found by its colour): outside the mask the "
        "edited latent is the source. Any MASK of the image's size works (a painted one, Load Image's alpha); "
        "ComfyUI resizes it to the latent. The same mask works with "
        "the RF samplers, FlowEdit, and Invert Latent + regeneration (pass the masked source as latent_image).",
        (COL[3], 520), width=340, height=220)
    return "RF-Inversion (masked)"


def flowedit(wf):
    """7. FlowEdit: an inversion-free edit with the one-node FlowEdit."""
    ckpt, image, enc = _load_sd3(wf)
    src, tgt = _edit_prompts(wf, ckpt)
    neg = wf.node("CLIPTextEncode", (COL[1], 440), title="Negative (empty)", clip=ckpt[1], text=NEGATIVE_PROMPT)
    edit = wf.node("FlowEdit", (COL[2], 0), width=320, model=ckpt[0], source=src[0], target=tgt[0],
                   negative=neg[0], latent=enc[0])
    dec = wf.node("VAEDecode", (COL[3], 0), samples=edit[0], vae=ckpt[2])
    save = wf.node("SaveImage", (COL[3], 120), extra_height=260, images=dec[0],
                   filename_prefix="exact_inversion/flowedit")
    wf.group("1. Image -> latent", [ckpt, image, enc], GROUP_COLORS["input"])
    wf.group("2. FlowEdit (no inversion)", [src, tgt, neg, edit], GROUP_COLORS["edit"])
    wf.group("3. Output", [dec, save], GROUP_COLORS["output"])
    wf.note(
        "## FlowEdit (flow models: SD3, Flux, Wan)\n"
        "Edits without inverting: n_max sets how strong the edit is (steps edited, counted from the end), "
        "target_cfg how hard it follows the target prompt. A noise_mask (Set Latent Noise Mask) confines it. "
        "For SamplerCustomAdvanced: FlowEdit Guider + FlowEdit Sampler + BasicScheduler + DisableNoise, the "
        "source latent as latent_image.", (COL[2], 560), width=340, height=240)
    return "FlowEdit"


def tree_ring_generate(wf):
    """6. Generate a Tree-Ring watermarked image: Tree-Ring Noise as SamplerCustomAdvanced's noise."""
    steps, cfg, sampler, scheduler = 20, 5.0, "euler", "normal"
    ckpt = wf.node("CheckpointLoaderSimple", (COL[0], 0), ckpt_name=SD15)
    pos = wf.node("CLIPTextEncode", (COL[1], 0), title="Prompt", extra_height=40, clip=ckpt[1], text=SOURCE_PROMPT)
    neg = wf.node("CLIPTextEncode", (COL[1], 220), title="Negative", extra_height=40, clip=ckpt[1],
                  text=NEGATIVE_PROMPT)
    noise = wf.node("TreeRingNoise", (COL[1], 440), title="Tree-Ring Noise (keep key_seed secret)")
    guider = wf.node("CFGGuider", (COL[2], 0), model=ckpt[0], positive=pos[0], negative=neg[0], cfg=cfg)
    select = wf.node("KSamplerSelect", (COL[2], 160), sampler_name=sampler)
    sigmas = wf.node("BasicScheduler", (COL[2], 280), model=ckpt[0], scheduler=scheduler, steps=steps, denoise=1.0)
    empty = wf.node("EmptyLatentImage", (COL[2], 460), width=512, height=512, batch_size=1)
    sample = wf.node("SamplerCustomAdvanced", (COL[3], 0), noise=noise[0], guider=guider[0], sampler=select[0],
                     sigmas=sigmas[0], latent_image=empty[0])
    dec = wf.node("VAEDecode", (COL[4], 0), samples=sample[0], vae=ckpt[2])
    save = wf.node("SaveImage", (COL[4], 120), extra_height=260, images=dec[0],
                   filename_prefix="exact_inversion/tree_ring_watermarked")
    wf.group("1. Watermarked noise", [ckpt, pos, neg, noise], GROUP_COLORS["input"])
    wf.group("2. Sample as usual", [guider, select, sigmas, empty, sample], GROUP_COLORS["invert"])
    wf.group("3. The watermarked image", [dec, save], GROUP_COLORS["output"])
    wf.note(
        "## Tree-Ring watermark (Wen et al. 2023)\n"
        "Tree-Ring Noise is ComfyUI's seeded noise with a secret ring pattern in the Fourier spectrum of one "
        "latent channel. The image looks like any other. Detect it with Tree-Ring Detect and the **same key_seed, "
        "channel and radius** (radius 10 suits 512 px SD1.5 images: 64x64 latents).\n\n"
        f"Detection is strongest with the generation's sampler, scheduler and steps ({sampler}, {scheduler}, "
        f"{steps}).", (COL[3], 300), width=340, height=260)
    return "Tree-Ring watermark (generate)"


def tree_ring_detect(wf):
    """7. Detect a Tree-Ring watermark in an image (e.g. a JPEG of workflow 6's output) by exact inversion."""
    steps, sampler, scheduler = 20, "euler", "normal"
    ckpt = wf.node("CheckpointLoaderSimple", (COL[0], 0), ckpt_name=SD15)
    image = wf.node("LoadImage", (COL[0], 200), extra_height=290, title="The image to check (JPEG is fine)",
                    image=INPUT_IMAGE)
    empty = wf.node("CLIPTextEncode", (COL[1], 0), title="Empty prompt (the paper's detection setting)",
                    extra_height=40, clip=ckpt[1], text="")
    detect = wf.node("TreeRingDetect", (COL[2], 0), width=340, extra_height=200, model=ckpt[0], positive=empty[0],
                     negative=empty[0], image=image[0], vae=ckpt[2], sampler_name=sampler, scheduler=scheduler,
                     steps=steps, cfg=1.0, method="exact")
    wf.group("1. The image", [ckpt, image], GROUP_COLORS["input"])
    wf.group("2. Invert to noise and compare with the key", [empty, detect], GROUP_COLORS["invert"])
    wf.note(
        "## Tree-Ring detection\n"
        "Load the image to check (a JPEG is fine, at the size it was generated), with the model that made it and the **same key_seed, channel "
        "and radius** as its Tree-Ring Noise. The node inverts the image to its noise (exact inversion) and shows "
        "the p-value and the verdict on itself; its outputs can drive other nodes.\n\n"
        "The p-value is the chance that an image **without** the watermark comes this close to the key. Other "
        "keys' watermarks can come close too: the p-value tells watermarked from clean, not key from key.\n\n"
        "The example image carries no watermark: expect 'no watermark'.", (COL[3], 0), width=340, height=340)
    return "Tree-Ring watermark (detect)"


def reversible_edit(wf):
    """8. Generate with the Reversible Sampler, invert the image with its exact inverse (Invert Latent, method
    reversible) and regenerate it with a new prompt; the inverted LATENT carries the second state."""
    steps, cfg, scheduler = 20, 3.0, "karras"
    ckpt = wf.node("CheckpointLoaderSimple", (COL[0], 0), ckpt_name=SD15)
    src = wf.node("CLIPTextEncode", (COL[0], 200), title="Prompt (the image)", extra_height=40, clip=ckpt[1],
                  text=SOURCE_PROMPT)
    neg = wf.node("CLIPTextEncode", (COL[0], 420), title="Negative", extra_height=40, clip=ckpt[1],
                  text=NEGATIVE_PROMPT)
    sampler = wf.node("ReversibleSampler", (COL[1], 0))
    sigmas = wf.node("BasicScheduler", (COL[1], 160), model=ckpt[0], scheduler=scheduler, steps=steps, denoise=1.0)
    noise = wf.node("RandomNoise", (COL[1], 340))
    guider = wf.node("CFGGuider", (COL[1], 480), model=ckpt[0], positive=src[0], negative=neg[0], cfg=cfg)
    empty = wf.node("EmptyLatentImage", (COL[1], 640), width=512, height=512, batch_size=1)
    gen = wf.node("SamplerCustomAdvanced", (COL[2], 0), noise=noise[0], guider=guider[0], sampler=sampler[0],
                  sigmas=sigmas[0], latent_image=empty[0])
    image = wf.node("VAEDecode", (COL[2], 300), samples=gen[0], vae=ckpt[2])
    save_gen = wf.node("SaveImage", (COL[2], 420), extra_height=260, images=image[0],
                       filename_prefix="exact_inversion/reversible_generated")
    enc = wf.node("VAEEncode", (COL[3], 0), pixels=image[0], vae=ckpt[2])
    inv = wf.node("InvertLatent", (COL[3], 120), model=ckpt[0], positive=src[0], negative=neg[0], latent=enc[0],
                  scheduler=scheduler, steps=steps, cfg=cfg, method="reversible")
    tgt = wf.node("CLIPTextEncode", (COL[3], 560), title="Target prompt (the edit)", extra_height=40,
                  clip=ckpt[1], text=TARGET_PROMPT)
    inv_noise = wf.node("InvertedNoise", (COL[4], 0), model=ckpt[0], latent=inv[0])
    regen_sampler = wf.node("ReversibleSampler", (COL[4], 120), title="Reversible Sampler (with the second state)",
                            second_state=inv[0])
    edit_guider = wf.node("CFGGuider", (COL[4], 300), model=ckpt[0], positive=tgt[0], negative=neg[0], cfg=cfg)
    edit = wf.node("SamplerCustomAdvanced", (COL[4], 460), noise=inv_noise[0], guider=edit_guider[0],
                   sampler=regen_sampler[0], sigmas=sigmas[0], latent_image=inv[0])
    dec = wf.node("VAEDecode", (COL[5], 0), samples=edit[0], vae=ckpt[2])
    save = wf.node("SaveImage", (COL[5], 120), extra_height=260, images=dec[0],
                   filename_prefix="exact_inversion/reversible_edit")
    wf.group("1. Generate with the Reversible Sampler", [ckpt, src, neg, sampler, sigmas, noise, guider, empty, gen,
                                                       image, save_gen], GROUP_COLORS["input"])
    wf.group("2. Image -> noise (its exact inverse)", [enc, inv], GROUP_COLORS["invert"])
    wf.group("3. Regenerate with the target prompt", [tgt, inv_noise, regen_sampler, edit_guider, edit, dec, save],
             GROUP_COLORS["edit"])
    wf.note(
        "## Reversible Sampler: generate, invert, edit\n"
        "The Reversible Sampler takes one model call per step, and its steps can be undone exactly: Invert Latent "
        "with method **reversible** needs no solve. Its LATENT carries a second state; pass it both as "
        "latent_image (through Inverted Noise) and as the Reversible Sampler's **second_state**.\n\n"
        f"Keep scheduler, steps, cfg and negative as at inversion ({scheduler}, {steps}, cfg {cfg}). With the "
        "source prompt the regeneration gives the image back; the target prompt edits it. Below 20 steps at high "
        "cfg it samples less accurately than euler (docs/results.md#reversible-cap).",
        (COL[5], 420), width=340, height=300)
    return "Reversible Sampler: generate, invert, edit"


WORKFLOWS = {
    "exact_inversion_reconstruction": reconstruction,
    "exact_inversion_prompt_edit_sd15": prompt_edit,
    "preciseinv_few_step": preciseinv_few_step,
    "rf_inversion_edit_samplers_sd3": rf_inversion_samplers,
    "rf_inversion_edit_one_node_sd3": rf_inversion_one_node,
    "rf_inversion_edit_masked_sd3": rf_inversion_masked,
    "flowedit_edit_sd3": flowedit,
    "tree_ring_watermark_generate_sd15": tree_ring_generate,
    "tree_ring_watermark_detect_sd15": tree_ring_detect,
    "reversible_sampler_edit_sd15": reversible_edit,
}


def build_all(object_info):
    """{name: (workflow dict, method)} for every workflow whose nodes are installed."""
    built, skipped = {}, {}
    for name, build in WORKFLOWS.items():
        wf = Workflow(object_info, name)
        try:
            method = build(wf)
        except KeyError as e:
            skipped[name] = f"node {e.args[0]} is not installed"
            continue
        built[name] = (wf.to_json(), method)
    return built, skipped


def object_info_from_server():
    from tests.support.comfy_runtime import ComfyServer
    with ComfyServer(tempfile.mkdtemp(prefix="ei_make_workflows_")) as server:
        return server.object_info()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = parser.parse_args(argv)
    built, skipped = build_all(object_info_from_server())
    stale = []
    for name, (workflow, method) in built.items():
        path = OUT_DIR / f"{name}.json"
        text = json.dumps(workflow, indent=2) + "\n"
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
            continue
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)} ({method})")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    if stale:
        sys.exit(f"out of date: {', '.join(stale)} (run tools/make_workflows.py)")


if __name__ == "__main__":
    main()
