"""A real, captioned image set for training the tiny models (issue 13): the colour emoji of Debian's
`fonts-noto-color-emoji` (SIL Open Font License), extracted into the cache, never committed.

`make dataset` (or `$COMFY_PYTHON tools/emoji_dataset.py [--out DIR]`):
1. `apt-get download` the pinned .deb into the cache (a package registry is all it needs), `dpkg -x` it;
2. read the font's CBDT bitmaps with fontTools (already in ComfyUI's venv: matplotlib depends on it);
3. keep the glyphs that are one code point, captioned by their Unicode name ("cat face", "red apple");
4. write each as a 128x128 RGB PNG on white (the 136x128 bitmap, 4 px cropped from each side) and
   `captions.json` ({file: caption}, sorted), plus `manifest.json` with the counts and a SHA-256 over the
   captions and pixels, so two machines can check they hold the same set.
"""
import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

PACKAGE, VERSION = "fonts-noto-color-emoji", "2.042-0+deb12u1"
FONT = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
SIZE = 128


def cache_dir():
    root = os.environ.get("EXACT_INVERSION_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
        / "comfyui-exact-inversion"
    return Path(root) / f"emoji-{VERSION}"


def fetch_font(work):
    """The pinned font file, downloaded and unpacked once."""
    font = work / "deb" / FONT
    if font.exists():
        return font
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=work, check=True)
    deb = next(work.glob(f"{PACKAGE}_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(work / "deb")], check=True)
    if not font.exists():
        sys.exit(f"{deb.name} has no {FONT}")
    return font


def single_code_point_glyphs(font_path):
    """{code point: PNG bytes} for the glyphs that one code point maps to."""
    from fontTools.ttLib import TTFont
    font = TTFont(str(font_path))
    bitmaps = font["CBDT"].strikeData[0]
    by_glyph = {}
    for code_point, glyph in font.getBestCmap().items():
        if glyph in bitmaps and code_point > 0x7F:   # the ASCII digits and signs are keycap parts
            by_glyph.setdefault(glyph, code_point)
    return {cp: bitmaps[glyph].imageData for glyph, cp in by_glyph.items()}


def to_rgb(png):
    from PIL import Image
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
    canvas.alpha_composite(image)
    left = (image.width - SIZE) // 2
    top = (image.height - SIZE) // 2
    return canvas.convert("RGB").crop((left, top, left + SIZE, top + SIZE))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where the images go (default: the cache)")
    args = parser.parse_args(argv)
    work = cache_dir()
    out = args.out or work / "images"
    glyphs = single_code_point_glyphs(fetch_font(work))
    out.mkdir(parents=True, exist_ok=True)
    captions, digest = {}, hashlib.sha256()
    for code_point in sorted(glyphs):
        try:
            caption = unicodedata.name(chr(code_point)).lower()
        except ValueError:
            continue   # unnamed in this Python's Unicode tables
        name = f"u{code_point:05x}.png"
        image = to_rgb(glyphs[code_point])
        image.save(out / name)
        captions[name] = caption
        digest.update(name.encode() + caption.encode() + image.tobytes())
    (out / "captions.json").write_text(json.dumps(captions, indent=1, sort_keys=True) + "\n")
    manifest = {"package": f"{PACKAGE} {VERSION}", "images": len(captions), "size": SIZE,
                "unicode": unicodedata.unidata_version, "sha256": digest.hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest))


if __name__ == "__main__":
    main()
