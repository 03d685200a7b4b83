"""An exact diffusion model of real images: the posterior-mean denoiser of a Gaussian
mixture centred on real photographs.

The data distribution is

    x0 ~ sum_k pi_k N(mu_k, C)

with the means mu_k real photos (scikit-image's sample images, downscaled to
``size`` x ``size`` RGB in [-1, 1], whole and zoomed quadrants, mirrored) and one
covariance C shared by all components that is diagonal in the 2-D DCT basis with a
natural-image spectrum (``rho`` times the photos' own per-frequency variance, radially
averaged). With x = a x0 + sigma eps (EPS: a = 1; flow: a = 1 - sigma) and
v_f = a^2 c_f + sigma^2 per DCT coefficient f, the exact posterior mean is

    D(x, sigma) = IDCT( m + (a c / v) (DCT(x) - a m) ),   m = sum_k w_k DCT(mu_k),
    w = softmax_k( log pi_k - sum_f (DCT(x)_f - a DCT(mu_k)_f)^2 / (2 v_f) ).

It is a true diffusion model (the denoiser every trained network approximates, for this
data), with known answers, and it costs a few matrix products per call. Its Jacobian has
the spectrum of a real model: low frequencies are "known" (gain ~1) long before high
ones, and the mixture weights switch sharply between photos as sigma falls.

Photos that are *not* in the mixture (``heldout_photo``, ``heldout_photos``) are the
"real images" to invert; images the model generated from known noise have a known exact inverse.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

MIXTURE_PHOTOS = ("astronaut", "coffee", "rocket", "hubble_deep_field", "retina",
                  "immunohistochemistry", "camera", "coins", "grass", "brick", "moon")
HELDOUT_PHOTOS = ("chelsea", "motorcycle_right", "lfw_face")
HELDOUT_SCENES = ("chelsea", "motorcycle_right", "clock", "gravel")  # cropped for ``heldout_photos``


def _require_skimage():
    try:
        import skimage.data
        import skimage.transform  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("the benchmark needs scikit-image for its photos: "
                         "pip install -r requirements-dev.txt") from exc


def _load(name: str) -> np.ndarray:
    """A sample photo as float RGB in [0, 1], shape (H, W, 3)."""
    from skimage import data
    if name.startswith("motorcycle"):
        left, right, _ = data.stereo_motorcycle()
        img = left if name.endswith("left") else right
    elif name == "lfw_face":
        img = data.lfw_subset()[0]  # 25 x 25 grey face, float in [0, 1]
    else:
        img = getattr(data, name)()
    img = np.asarray(img)
    if img.dtype == np.uint8:
        img = img.astype(np.float64) / 255.0
    img = img.astype(np.float64)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return img[:, :, :3]


def _square(img: np.ndarray, box=None) -> np.ndarray:
    h, w = img.shape[:2]
    if box is not None:  # (top, left, size) as fractions
        t, l, s = box
        side = int(min(h, w) * s)
        top, left = int(t * (h - side)), int(l * (w - side))
    else:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
    return img[top:top + side, left:left + side]


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    import skimage.transform
    return skimage.transform.resize(img, (size, size), anti_aliasing=True)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).double() * 2 - 1


@lru_cache(maxsize=8)
def mixture_means(size: int = 32, zoom: bool = True) -> torch.Tensor:
    """(K, 3, size, size) in [-1, 1]: each photo whole and (zoom) its four quadrants at
    2x, each also mirrored."""
    _require_skimage()
    crops = []
    for name in MIXTURE_PHOTOS:
        img = _load(name)
        boxes = [None] + ([(0, 0, 0.5), (0, 1, 0.5), (1, 0, 0.5), (1, 1, 0.5)] if zoom else [])
        for box in boxes:
            sq = _resize(_square(img, box), size)
            crops += [sq, sq[:, ::-1]]
    return torch.stack([_to_tensor(c) for c in crops])


@lru_cache(maxsize=8)
def heldout_photo(name: str, size: int = 32) -> torch.Tensor:
    """A real photo that is not in the mixture, (1, 3, size, size) in [-1, 1], float32."""
    _require_skimage()
    return _to_tensor(_resize(_square(_load(name)), size))[None].float()


def heldout_photos(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """``count`` real photos that are not in the mixture, (count, 3, size, size) in [-1, 1],
    float32: alternately one of scikit-image's 200 LFW faces and a random square crop (a
    third of the short side to all of it) of one of ``HELDOUT_SCENES``, each mirrored at
    random; the same ``seed`` gives the same photos."""
    _require_skimage()
    from skimage import data
    faces = data.lfw_subset()
    scenes = [_load(name) for name in HELDOUT_SCENES]
    rng = np.random.RandomState(seed)
    photos = []
    for k in range(count):
        if k % 2 == 0:
            face = faces[(k // 2 + seed) % len(faces)]
            img = np.repeat(np.asarray(face, dtype=np.float64)[:, :, None], 3, axis=2)
        else:
            img = _square(scenes[(k // 2) % len(scenes)], (rng.rand(), rng.rand(), rng.uniform(1 / 3, 1)))
        img = _resize(img, size)
        photos.append(img[:, ::-1] if rng.rand() < 0.5 else img)
    return torch.stack([_to_tensor(p) for p in photos]).float()


@lru_cache(maxsize=8)
def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix (n, n), float64: y = M x."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    m = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def dct2(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return m @ x @ m.T


def idct2(y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return m.T @ y @ m


class PhotoMixture:
    """The exact denoiser ``D(x, sigma)`` of the photo mixture (ComfyUI's convention:
    x0-prediction, ``sigma`` of shape (B,)); computes in float64, returns x's dtype.

    family: "eps" (x = x0 + sigma eps) or "flow" (x = (1 - sigma) x0 + sigma eps).
    rho:    the components' spread as a fraction of the photos' own spectrum.
    isotropic: instead, isotropic components of this std in pixel space (a "tight"
            mixture: 0.3 puts the photos' modes far apart relative to their spread).
    """

    def __init__(self, family: str = "eps", size: int = 32, rho: float = 1.0, floor: float = 0.01,
                 zoom: bool = True, isotropic: float | None = None):
        if family not in ("eps", "flow"):
            raise ValueError(f"family must be eps or flow, got {family!r}")
        self.family, self.size, self.rho = family, size, rho
        self.mu = mixture_means(size, zoom)                       # (K, 3, n, n)
        self.m = dct_matrix(size)
        mu_hat = dct2(self.mu, self.m)                             # (K, 3, n, n)
        self.mu_hat = mu_hat.flatten(1)                            # (K, D)
        # natural-image spectrum: variance of the photos' DCT coefficients, radially averaged
        var = mu_hat.var(0).mean(0)                                # (n, n)
        f = torch.arange(size, dtype=torch.float64)
        radius = (f[:, None] ** 2 + f[None] ** 2).sqrt().round().long()
        radial = torch.zeros(int(radius.max()) + 1, dtype=torch.float64).index_add_(
            0, radius.flatten(), var.flatten())
        counts = torch.zeros_like(radial).index_add_(0, radius.flatten(), torch.ones_like(var.flatten()))
        spectrum = (radial / counts)[radius]
        self.c = (rho * spectrum + floor).expand(3, size, size).reshape(-1).clone()  # (D,)
        if isotropic is not None:  # the orthonormal DCT keeps an isotropic covariance isotropic
            self.c = torch.full_like(self.c, float(isotropic) ** 2)
        self.log_pi = torch.full((self.mu.shape[0],), -math.log(self.mu.shape[0]), dtype=torch.float64)
        self.calls = 0

    @property
    def shape(self) -> tuple:
        return (3, self.size, self.size)

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma) if self.family == "eps" else 1.0 - sigma

    def _posterior(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, ...]:
        """(y, a, v, w): x's DCT coefficients (B, D), a (B, 1), each coefficient's variance about a
        component v = a^2 c + s^2 (B, D), and the posterior component weights w (B, K)."""
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        if s.shape[0] == 1 and x.shape[0] > 1:
            s = s.expand(x.shape[0], 1)
        y = dct2(x.double(), self.m).flatten(1)
        a = self.alpha(s)
        v = a ** 2 * self.c + s ** 2
        # logits up to terms equal for all k: (a y.mu_k - a^2 mu_k^2 / 2) / v
        logits = self.log_pi + (a * y / v) @ self.mu_hat.T - 0.5 * (a ** 2 / v) @ (self.mu_hat ** 2).T
        return y, a, v, torch.softmax(logits, dim=1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y, a, v, w = self._posterior(x, sigma)
        mean = w @ self.mu_hat                                     # (B, D)
        post = mean + (a * self.c / v) * (y - a * mean)
        out = idct2(post.view(x.shape).double(), self.m)
        return out.to(x.dtype)

    def jacobian(self, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The exact dD/dx at one latent ``x`` (batch 1) in DCT coefficients, as
        diag(gain) + U V^T (rank K + 1): the Wiener gain a c / v, plus how the component
        weights move the mean, (1 - a^2 c / v) Cov_w[mu] (a / v), Cov_w = mu^T (diag w - w w^T) mu."""
        _, a, v, w = (t[0] for t in self._posterior(x, float(sigma)))
        spread = self.mu_hat.T * w.sqrt()                        # (D, K)
        mean = (w @ self.mu_hat)[:, None]                        # (D, 1)
        u = (1 - a ** 2 * self.c / v)[:, None] * torch.cat([spread, -mean], 1)
        v_ = (a / v)[:, None] * torch.cat([spread, mean], 1)
        return a * self.c / v, u, v_

    def weights(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Posterior component weights (diagnostics)."""
        return self._posterior(x, float(sigma))[3]

    def sample(self, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """Draws from the mixture itself (a photo plus its component's spread): images of the
        model's world that its few-step sampler did not generate, so no exact inverse exists."""
        g = torch.Generator().manual_seed(seed)
        k = torch.randint(self.mu_hat.shape[0], (batch,), generator=g)
        y = self.mu_hat[k] + self.c.sqrt() * torch.randn(batch, self.c.numel(), generator=g, dtype=torch.float64)
        return idct2(y.view(batch, *self.shape), self.m).float()

    def initial_noise(self, sigma_max: float, batch: int = 1, seed: int = 0) -> torch.Tensor:
        """The latent at sigma_max from a unit Gaussian (EPS: sigma_max * n; flow: n)."""
        g = torch.Generator().manual_seed(seed)
        return float(sigma_max) * torch.randn(batch, *self.shape, generator=g)
