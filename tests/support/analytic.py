"""Closed-form reference models with exact answers, for tests and benchmarks (no ComfyUI).

- `LinearVAE`: decode(z) = A z + b with a full-column-rank A, encode(x) = pinv(A) (x - b),
  so E is the exact left-inverse of D and E(D(z)) = z.
- `GaussianMixtureDenoiser`: data x0 ~ sum_k w_k N(mu_k, s_k^2 I); the MMSE denoiser
  D(x, sigma) = E[x0 | x] in closed form, for EPS (x = x0 + sigma*n) or flow
  (x = (1 - sigma)*x0 + sigma*n). `cfg_denoiser` combines two of them as CFG does.
"""
from types import SimpleNamespace

import torch


class LinearVAE:
    def __init__(self, latent_shape=(4, 8, 8), scale=8, channels=3, seed=0, dtype=torch.float32,
                 compute_dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.latent_shape = tuple(latent_shape)
        c, h, w = latent_shape
        self.image_shape = (channels, h * scale, w * scale)
        n_z, n_x = c * h * w, channels * h * w * scale * scale
        self.A = (torch.randn(n_x, n_z, generator=g, dtype=torch.float64) / n_z ** 0.5)
        self.b = 0.5 + 0.1 * torch.randn(n_x, generator=g, dtype=torch.float64)
        self.A_pinv = torch.linalg.pinv(self.A)
        self.dtype = dtype
        self.compute_dtype = compute_dtype   # float32 where the device has no float64 (Apple GPUs)

    def _on(self, t, like):
        return t.to(device=like.device, dtype=self.compute_dtype)

    def decode(self, z):
        x = z.flatten(1).to(self.compute_dtype) @ self._on(self.A, z).T + self._on(self.b, z)
        return x.view(z.shape[0], *self.image_shape).to(z.dtype)

    def encode(self, x):
        z = (x.flatten(1).to(self.compute_dtype) - self._on(self.b, x)) @ self._on(self.A_pinv, x).T
        return z.view(x.shape[0], *self.latent_shape).to(x.dtype)


class GaussianMixtureDenoiser:
    """MMSE denoiser of an isotropic Gaussian mixture; `parameterization` is 'eps' or 'flow'."""

    def __init__(self, means, stds, weights, parameterization="eps", compute_dtype=torch.float64):
        self.means = torch.as_tensor(means, dtype=torch.float64)        # (K, *shape)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)          # (K,)
        self.log_w = torch.log(torch.as_tensor(weights, dtype=torch.float64))
        if parameterization not in ("eps", "flow"):
            raise ValueError(f"parameterization must be 'eps' or 'flow', got {parameterization!r}")
        self.parameterization = parameterization
        self.compute_dtype = compute_dtype   # float32 where the device has no float64 (Apple GPUs)
        self.calls = 0

    @classmethod
    def random(cls, shape=(4, 8, 8), components=3, seed=0, parameterization="eps", weights=None,
               compute_dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(components, *shape, generator=g, dtype=torch.float64)
        stds = 0.2 + 0.3 * torch.rand(components, generator=g, dtype=torch.float64)
        weights = weights if weights is not None else [1.0 / components] * components
        return cls(means, stds, weights, parameterization, compute_dtype)

    def signal_scale(self, sigma):
        return 1 - sigma if self.parameterization == "flow" else torch.ones_like(sigma)

    def sample(self, n, generator=None):
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        noise = torch.randn(n, *self.means.shape[1:], generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k].view(-1, *[1] * (noise.ndim - 1)) * noise

    def __call__(self, x, sigma):
        """D(x, sigma) = E[x0 | x_sigma = x]; sigma is a scalar or a (B,) tensor."""
        self.calls += 1
        dtype, ct, dev = x.dtype, self.compute_dtype, x.device
        x64 = x.to(ct).flatten(1)                                            # (B, d)
        sigma = torch.as_tensor(sigma, dtype=ct, device=dev).reshape(-1, 1)  # (B or 1, 1)
        a = self.signal_scale(sigma)                                       # x = a*x0 + sigma*n
        mu, stds, log_w = (t.to(device=dev, dtype=ct) for t in (self.means.flatten(1), self.stds, self.log_w))
        var = a ** 2 * stds ** 2 + sigma ** 2                               # (B, K)
        d = mu.shape[1]
        sq = (x64[:, None, :] - a[:, :, None] * mu[None]).pow(2).sum(-1)    # (B, K)
        log_r = log_w - 0.5 * sq / var - 0.5 * d * torch.log(var)
        r = torch.softmax(log_r, dim=1)                                    # (B, K)
        gain = a * stds ** 2 / var                                    # (B, K)
        post = mu[None] + gain[:, :, None] * (x64[:, None, :] - a[:, :, None] * mu[None])
        return (r[:, :, None] * post).sum(1).view(x.shape).to(dtype)


def cfg_denoiser(cond, uncond, cfg):
    """Classifier-free guidance over two denoisers: D_u + cfg * (D_c - D_u)."""
    def denoise(x, sigma):
        d_u = uncond(x, sigma)
        return d_u + cfg * (cond(x, sigma) - d_u)
    return denoise


class AnalyticCFG:
    """The mixture CFG denoiser in ComfyUI's model call convention; runs the post-CFG hooks that the
    cfg_pp samplers register, with the uncond prediction, as ComfyUI's CFGGuider does. Given a
    `model_sampling`, it is found where ComfyUI's samplers look for it (inner_model.model_patcher)."""

    def __init__(self, parameterization, cfg, model_sampling=None):
        self.cond = GaussianMixtureDenoiser.random(parameterization=parameterization, weights=[0.6, 0.3, 0.1])
        self.uncond = GaussianMixtureDenoiser.random(parameterization=parameterization, weights=[0.2, 0.3, 0.5])
        self.cfg = cfg
        # without one, an empty stand-in: ComfyUI 0.33's res_multistep reads an optional noise_scale from it,
        # and a sampler that needs a real model_sampling still fails loudly on the missing attribute
        objects = {"model_sampling": model_sampling if model_sampling is not None else SimpleNamespace()}
        self.inner_model = SimpleNamespace(model_patcher=SimpleNamespace(get_model_object=objects.__getitem__))

    def __call__(self, x, sigma, model_options=None, **unused):
        cond, uncond = self.cond(x, sigma).to(x.dtype), self.uncond(x, sigma).to(x.dtype)
        denoised = uncond + self.cfg * (cond - uncond)
        for hook in (model_options or {}).get("sampler_post_cfg_function", []):
            denoised = hook({"denoised": denoised, "uncond_denoised": uncond, "cond_denoised": cond,
                             "sigma": sigma, "input": x, "model_options": model_options})
        return denoised
