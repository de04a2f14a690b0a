"""Pure-torch inversion algorithms (no ComfyUI imports), one flat function per method, each in
k-diffusion's shape: `fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)`
returns the result and reports per-step diagnostics through the callback dict (see common.py).
Decoder inversion has the same shape over `encode` / `decode` callables (decoder.py).
"""
