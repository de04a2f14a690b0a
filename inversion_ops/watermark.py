"""Tree-Ring watermarks (Wen et al., NeurIPS 2023), "rings" pattern: ring i of one latent channel's centred,
orthonormal 2-D FFT is set to key value i in the initial noise; detection inverts to the noise and tests the
circle's independent Fourier components (each conjugate pair once, and the zero frequency) against the key.
"""
import math

import torch

KEY_SEED = 0
CHANNEL = 3          # the paper's w_channel for SD (the last of 4 latent channels)
RADIUS = 10          # the paper's w_radius on 64x64 latents
FALSE_POSITIVE_RATE = 0.01


def check_ring_fits(shape, channel, radius, name="latent"):
    """A (B, C, H, W) latent must have `channel` and room for the circle inside its Nyquist rows."""
    if len(shape) != 4:
        raise ValueError(f"{name} has shape {tuple(shape)}: Tree-Ring watermarks image latents (B, C, H, W)")
    if not 0 <= channel < shape[1]:
        raise ValueError(f"channel {channel} does not exist: {name} has {shape[1]} channels (0 to {shape[1] - 1})")
    limit = (min(shape[2], shape[3]) - 1) // 2
    if not 1 <= radius <= limit:
        raise ValueError(f"radius {radius} does not fit {name}'s {shape[3]}x{shape[2]} latent: use 1 to {limit} "
                         f"(the circle must stay inside the Nyquist frequencies)")


def ring_key(key_seed, radius):
    """The key: one real value per ring from N(0, 1/2) (a unit latent's Fourier real part), drawn on the CPU."""
    g = torch.Generator().manual_seed(int(key_seed))
    return torch.randn(radius, generator=g, dtype=torch.float64) * math.sqrt(0.5)  # cpu: one key on every machine


def ring_index(height, width, radius, device=None):
    """(H, W) long tensor in fftshift layout: the ring (1..radius) of each frequency, 0 outside the circle."""
    ky = torch.arange(height, device=device) - height // 2
    kx = torch.arange(width, device=device) - width // 2
    distance = (ky[:, None] ** 2 + kx[None, :] ** 2).double().sqrt()
    ring = distance.ceil().clamp(min=1).long()
    return torch.where(distance <= radius, ring, torch.zeros_like(ring))


def _spectrum(channel_latent):
    """Centred orthonormal 2-D FFT of (B, H, W); float32 stays float32 (devices without float64)."""
    x = channel_latent if channel_latent.dtype == torch.float64 else channel_latent.float()
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def embed_rings(noise, key_seed=KEY_SEED, channel=CHANNEL, radius=RADIUS):
    """A copy of noise (B, C, H, W) with the key's rings written into `channel` of every sample."""
    check_ring_fits(noise.shape, channel, radius, "noise")
    ring = ring_index(noise.shape[-2], noise.shape[-1], radius, noise.device)
    spectrum = _spectrum(noise[:, channel])
    key = ring_key(key_seed, radius).to(device=noise.device, dtype=spectrum.real.dtype)
    pattern = torch.cat([key.new_zeros(1), key])[ring].to(spectrum.dtype)
    spectrum = torch.where(ring > 0, pattern, spectrum)
    marked = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)), norm="ortho").real
    out = noise.clone()
    out[:, channel] = marked.to(noise.dtype)
    return out


def _half_region(ring):
    """Masks (fftshift layout) of one frequency per conjugate pair in the circle, and of the zero frequency."""
    height, width = ring.shape
    ky = torch.arange(height, device=ring.device)[:, None] - height // 2
    kx = torch.arange(width, device=ring.device)[None, :] - width // 2
    inside = ring > 0
    half = inside & ((ky > 0) | ((ky == 0) & (kx > 0)))
    zero = (ky == 0) & (kx == 0)
    return half, zero


def ring_coefficients(latent, channel, radius):
    """(z, rings): the circle's independent Fourier components (B, d), float64 on the CPU, unit variance for
    unit noise, and the ring of each."""
    ring = ring_index(latent.shape[-2], latent.shape[-1], radius, latent.device)
    half, zero = _half_region(ring)
    spectrum = _spectrum(latent[:, channel])
    pairs, dc = spectrum[:, half].cpu(), spectrum[:, zero].cpu()
    root2 = math.sqrt(2.0)
    z = torch.cat([pairs.real.double() * root2, pairs.imag.double() * root2, dc.real.double()], dim=1)
    rings = ring[half].cpu(), ring[zero].cpu()
    return z, rings


def ring_distance(latent, key_seed=KEY_SEED, channel=CHANNEL, radius=RADIUS):
    """The paper's distance: mean |F(latent) - key| over the circle (orthonormal FFT units), per sample."""
    check_ring_fits(latent.shape, channel, radius)
    ring = ring_index(latent.shape[-2], latent.shape[-1], radius, latent.device)
    spectrum = _spectrum(latent[:, channel])[:, ring > 0].cpu().to(torch.complex128)
    # cpu: the key and the distance are float64 statistics, kept on the host
    key = torch.cat([torch.zeros(1, dtype=torch.float64, device="cpu"), ring_key(key_seed, radius)])
    key = key[ring[ring > 0].cpu()]
    return (spectrum - key).abs().mean(dim=1)


def detect(latent, key_seed=KEY_SEED, channel=CHANNEL, radius=RADIUS):
    """Tree-Ring detection on inverted noise (B, C, H, W), per sample: the paper's L1 `distance` and
    `statistic` ||z - kappa||^2 / s^2, `p_value` exact given ||z|| (`conditional_p_value`), and the paper's
    plug-in `p_value_plugin` (conservative: see docs/results.md#p-value-plugin). The null is Gaussian noise,
    so it tells watermarked from clean, not one key from another (see docs/results.md#wrong-keys)."""
    check_ring_fits(latent.shape, channel, radius)
    z, (pair_rings, dc_ring) = ring_coefficients(latent, channel, radius)
    key = ring_key(key_seed, radius)
    # cpu: like z, the statistics run in float64 on the host
    kappa = torch.cat([key[pair_rings - 1] * math.sqrt(2.0),
                       torch.zeros(len(pair_rings), dtype=torch.float64, device="cpu"), key[dc_ring - 1]])
    d = z.shape[1]
    variance = z.pow(2).mean(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    statistic = (z - kappa).pow(2).sum(dim=1) / variance
    noncentrality = kappa.pow(2).sum() / variance
    correlation = (z @ kappa) / (z.norm(dim=1) * kappa.norm()).clamp_min(torch.finfo(torch.float64).tiny)
    return {
        "distance": ring_distance(latent, key_seed, channel, radius),
        "statistic": statistic,
        "p_value": torch.tensor(  # cpu: float64 p-values computed on the host
            [conditional_p_value(float(c), d) for c in correlation], dtype=torch.float64, device="cpu"),
        "p_value_plugin": torch.stack([ncx2_cdf(float(x), d, float(nc)) for x, nc in zip(statistic, noncentrality)]),
        "correlation": correlation,
        "degrees_of_freedom": d,
    }


def conditional_p_value(correlation, d):
    """P(statistic <= observed | ||z||) under z ~ N(0, s^2 I_d): the cosine C of a uniform direction with kappa
    has (1 + C) / 2 ~ Beta((d - 1) / 2, (d - 1) / 2), so it is I_{(1 - c) / 2}((d - 1) / 2, (d - 1) / 2)."""
    a = (d - 1) / 2.0
    return regularized_beta(a, a, (1.0 - correlation) / 2.0)


def regularized_beta(a, b, x):
    """I_x(a, b) in float64 by the incomplete beta's continued fraction (modified Lentz), on its fast side."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a, b, x, iterations=10000, eps=1e-15):
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iterations + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def ncx2_cdf(x, df, nc):
    """Noncentral chi-squared CDF in float64 on the CPU: sum_j Pois(j; nc / 2) P(df / 2 + j, x / 2)."""
    x = torch.as_tensor(x, dtype=torch.float64)   # cpu: small float64 series (Apple GPUs have no float64)
    if nc <= 0:
        return torch.special.gammainc(torch.tensor(df / 2.0, dtype=torch.float64, device="cpu"), x / 2)
    mean = nc / 2.0
    spread = 12.0 * math.sqrt(mean) + 20.0
    j = torch.arange(max(0, int(mean - spread)), int(mean + spread) + 1, dtype=torch.float64, device="cpu")
    log_weight = -mean + j * math.log(mean) - torch.lgamma(j + 1)
    return (log_weight.exp() * torch.special.gammainc(df / 2.0 + j, x / 2)).sum()
