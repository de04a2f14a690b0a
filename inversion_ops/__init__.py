"""Pure-torch inversion algorithms, one function per method in k-diffusion's shape (see common.py)."""
