"""How far a dataset is from ImageNet, measured: what pretrained features buy over random ones.

On a class-stratified sample, features come from the pretrained ImageNet backbone and from the same
architecture with random weights. Each set is scored by leave-one-out kNN accuracy and by LogME (You et al.,
ICML 2021). LogME alone is only a relative score, so it is never thresholded raw: the measured transfer is the
*gain* of pretrained over random features, and the threshold between "ImageNet-like" and "far" is on that gain
(calibration in bench/RESULTS.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from visionroute.data.dataset import ImageDataset, decode_all, stratified_sample

FAR_BELOW_KNN_GAIN = 0.10
"""A kNN accuracy gain of pretrained over random features below this means ImageNet features barely help:
the data is treated as far from ImageNet. Calibrated on the shared datasets (1,000-image samples,
tf_efficientnet_lite0): hymenoptera +0.36, NEU steel +0.27, PneumoniaMNIST at 28 px -0.01; the threshold sits
between. See bench/RESULTS.md for the figures and the calibration's limits."""


@dataclass(frozen=True)
class DomainMeasurement:
    images: int
    knn_accuracy_pretrained: float
    knn_accuracy_random: float
    logme_pretrained: float
    logme_random: float
    seconds: float
    model: str

    @property
    def knn_gain(self) -> float:
        return self.knn_accuracy_pretrained - self.knn_accuracy_random

    @property
    def logme_gain(self) -> float:
        return self.logme_pretrained - self.logme_random

    @property
    def far(self) -> bool:
        return self.knn_gain < FAR_BELOW_KNN_GAIN

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "knn_gain": round(self.knn_gain, 4),
            "logme_gain": round(self.logme_gain, 4),
            "far": self.far,
            "threshold_knn_gain": FAR_BELOW_KNN_GAIN,
            "sentence": self.sentence(),
        }

    def sentence(self) -> str:
        verdict = "far from ImageNet" if self.far else "ImageNet-like"
        return (
            f"Measured on {self.images} images: pretrained features reach {self.knn_accuracy_pretrained:.2f} kNN "
            f"accuracy against {self.knn_accuracy_random:.2f} for random ones (gain {self.knn_gain:+.2f}; "
            f"LogME {self.logme_pretrained:.3f} vs {self.logme_random:.3f}), so the data is {verdict} "
            f"(threshold: gain {FAR_BELOW_KNN_GAIN:.2f})."
        )


def logme(features: np.ndarray, labels: np.ndarray, iterations: int = 30) -> float:
    """LogME: mean over classes of the log evidence per sample of a Bayesian linear model on the features."""
    f = features.astype(np.float64)
    n = f.shape[0]
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    rank = int((sigma > 1e-10 * sigma.max()).sum())
    u, sigma = u[:, :rank], sigma[:rank]
    evidences = []
    for label in np.unique(labels):
        y = (labels == label).astype(np.float64)
        x2 = (u.T @ y) ** 2
        outside = max(float(y @ y - x2.sum()), 0.0)  # energy of y outside the span of the features
        alpha, beta = 1.0, 1.0
        for _ in range(iterations):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
            res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + outside
            alpha, beta_new = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            converged = abs(beta_new - beta) / beta < 1e-3
            beta = beta_new
            if converged:
                break
        t = alpha / beta
        m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
        res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + outside
        # Directions outside the features' span add (D - rank) log(alpha) twice with opposite signs: cancelled.
        evidence = (
            rank / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * np.log(alpha + beta * sigma).sum()
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy on standardised, L2-normalised features (cosine)."""
    f = (features - features.mean(0)) / (features.std(0) + 1e-6)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-12
    similarity = f @ f.T
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argpartition(-similarity, kth=min(k, len(f) - 1) - 1, axis=1)[:, :k]
    votes = labels[neighbours]
    predicted = np.array([np.bincount(row, minlength=labels.max() + 1).argmax() for row in votes])
    return float((predicted == labels).mean())


def measure_domain(
    dataset: ImageDataset,
    model_name: str = "tf_efficientnet_lite0",
    limit: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> DomainMeasurement:
    """Pretrained against random features of `model_name` on up to `limit` images, at native resolution."""
    from dataclasses import replace

    from visionroute.training.engine import Preprocessing, build_model, pick_device, predict_logits
    from visionroute.training.weights import load_pretrained, resolve_pretrained

    started = time.perf_counter()
    sample = replace(dataset, samples=stratified_sample(dataset, limit, seed))
    pretrained = build_model(model_name, 2)
    load_pretrained(pretrained, resolve_pretrained(model_name, pretrained), 2)
    torch.manual_seed(seed)
    random_init = build_model(model_name, 2)
    prep = Preprocessing.for_model(pretrained, model_name, dataset.classes)
    crops, _ = decode_all(sample, prep.to_stored, progress=progress)
    kept = [s for s in sample.samples if s.ref in crops]
    x = np.stack([crops[s.ref] for s in kept])
    labels = np.array([s.label for s in kept])
    device = pick_device()
    scores = {}
    for name, model in (("pretrained", pretrained), ("random", random_init)):
        features = predict_logits(model.to(device), x, prep, device, features=True).numpy()
        scores[name] = (knn_accuracy(features, labels), logme(features, labels))
    return DomainMeasurement(
        images=len(kept),
        knn_accuracy_pretrained=round(scores["pretrained"][0], 4),
        knn_accuracy_random=round(scores["random"][0], 4),
        logme_pretrained=round(scores["pretrained"][1], 4),
        logme_random=round(scores["random"][1], 4),
        seconds=round(time.perf_counter() - started, 1),
        model=model_name,
    )
