"""Distribution metrics beside the pairwise ones (issue 32): how a student's samples spread, not how close each one
is to the teacher's sample from the same noise.

* ``precision_recall``: improved precision and recall (Kynkäänniemi et al. 2019) in a feature space. Each set's
  manifold is the union of balls around its points, of radius the distance to the k-th nearest neighbour in the same
  set; precision is the fraction of generated points inside the reference manifold (are the samples realistic),
  recall the fraction of reference points inside the generated one (are the modes covered). ``coverage`` (Naeem et
  al. 2020) is the fraction of reference points whose own ball holds a generated point (less fooled by outliers).
* ``high_frequency_energy``: the share of each image's spectral energy above half the Nyquist frequency, averaged
  (per channel, mean removed): a sharpness measure. Blurry samples have less than the teacher's; compare the ratio.
* ``frechet_distance`` (Heusel et al. 2017) of two feature sets: used with reference samples from *other* noise, it
  measures the distribution, not the pairing.

Each metric has a floor: the teacher's samples from one set of noise against its samples from another
(``teacher_floor`` in the benchmarks), the value a perfect student would get at the same sample sizes.
"""

from __future__ import annotations

import numpy as np
import torch


PAPER_NEIGHBOURS = 3  # k of the k-NN balls: Kynkäänniemi et al.'s and Naeem et al.'s choice


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets [n, d] (Heusel et al. 2017)."""
    from scipy import linalg

    a, b = (f.detach().double().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f, dtype=np.float64)
            for f in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [n, d] with the same d, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("the Fréchet distance needs at least 2 samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(covmean).all():
        # Near-singular covariances (few samples): regularize as pytorch-fid does.
        eps = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
    return max(fd, 0.0)


def _as_array(features) -> np.ndarray:
    a = features.detach().double().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    if a.ndim != 2:
        raise ValueError(f"features must be [n, d], got {a.shape}")
    return a


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [len(a), len(b)]."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def _radii(a: np.ndarray, k: int) -> np.ndarray:
    """Each point's distance to its k-th nearest other point of the same set."""
    if len(a) <= k:
        raise ValueError(f"k = {k} nearest neighbours need more than {k} points, got {len(a)}")
    return np.sort(_distances(a, a), axis=1)[:, k]  # column 0 is the point itself


def precision_recall(reference, generated, k: int = PAPER_NEIGHBOURS) -> dict[str, float]:
    """Improved precision, recall (Kynkäänniemi et al. 2019) and coverage (Naeem et al. 2020) of ``generated``
    features [m, d] against ``reference`` features [n, d], with k-NN balls (k = 3, the papers' choice)."""
    real, fake = _as_array(reference), _as_array(generated)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must have the same d, got {real.shape} and {fake.shape}")
    real_r, fake_r = _radii(real, k), _radii(fake, k)
    d = _distances(fake, real)  # [m, n]
    precision = float((d <= real_r[None]).any(1).mean())
    recall = float((d.T <= fake_r[None]).any(1).mean())
    coverage = float((d <= real_r[None]).any(0).mean())
    return {"precision": precision, "recall": recall, "coverage": coverage}


def high_frequency_energy(images: torch.Tensor, cutoff: float = 0.5) -> float:
    """Mean share of spectral energy above ``cutoff`` x Nyquist (radially) of images [B, C, H, W], each channel's mean
    removed. 0 for a flat image; higher for sharper edges and finer texture."""
    x = images.detach().double().cpu()
    if x.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got {tuple(x.shape)}")
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs() ** 2
    fy = torch.fft.fftfreq(x.shape[2], dtype=torch.float64).abs()[:, None]
    fx = torch.fft.fftfreq(x.shape[3], dtype=torch.float64).abs()[None]
    high = (torch.sqrt(fy * fy + fx * fx) > 0.5 * cutoff)  # fftfreq's Nyquist is 0.5
    total = power.sum(dim=(2, 3))
    share = (power * high).sum(dim=(2, 3)) / total.clamp_min(1e-12)
    return float(share[total > 1e-12].mean()) if (total > 1e-12).any() else 0.0


def distribution_metrics(reference_features, generated_features, reference_images: torch.Tensor,
                         generated_images: torch.Tensor, k: int = PAPER_NEIGHBOURS) -> dict[str, float]:
    """FD, precision, recall, coverage and the high-frequency energy ratio (generated / reference) of one sample set
    against a reference set (the teacher's samples from other noise); precision, recall and coverage only where each
    set has more than ``k`` points."""
    reference_features, generated_features = _as_array(reference_features), _as_array(generated_features)
    out = {"fd": frechet_distance(generated_features, reference_features)}
    if min(len(reference_features), len(generated_features)) > k:
        out.update(precision_recall(reference_features, generated_features, k))
    ref_hf = high_frequency_energy(reference_images)
    out["sharpness"] = high_frequency_energy(generated_images) / ref_hf if ref_hf > 0 else float("nan")
    return out


def against_other_noise(other_features, features, other_images: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """``distribution_metrics`` against the teacher's images of the same prompts from other noise, its FD named
    ``fd_teacher_other`` (evaluate's row and validation's ``val_`` fields)."""
    out = distribution_metrics(other_features, features, other_images, images)
    return {"fd_teacher_other": out.pop("fd"), **out}
