"""Sample quality in a feature extractor's space: Frechet distance (FID), Inception Score,
precision and recall (the k-nearest-neighbour manifolds of Kynkaanniemi et al., k = 3, as
ADM's evaluator computes them), and the accuracy of class-conditional samples when the
extractor classifies the recipe's classes.

Images come from a sample folder (``flashar-adapt sample``), an ``.npz`` in the ADM layout
(``arr_0`` uint8 [N, H, W, 3]) or a folder of image files; a reference may instead be
precomputed statistics, an ``.npz`` holding ``mu`` and ``sigma`` (FID only). Statistics and
the distance are computed in float64.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import InputError
from .extractors import FeatureExtractor
from .files import atomic_write
from .image_folders import IMAGE_SUFFIXES
from .npz_images import NpzError, NpzImages
from .recipe import Recipe, recipe_from_dict
from .sample_sets import MANIFEST, RUN, read_manifest


class QualityError(InputError):
    """Images or statistics that cannot be compared (too few, other sizes, other extractor)."""


# ---------------------------------------------------------------- the numbers


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1^1/2 sigma2 sigma1^1/2)^1/2)."""
    mu1, mu2, s1, s2 = (torch.as_tensor(x, dtype=torch.float64) for x in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise QualityError(f"statistics of different sizes: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ s2 @ root).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)


def mean_cov(feats: torch.Tensor, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of features [N, F], centred in float64."""
    n = feats.shape[0]
    if n < 2:
        raise QualityError(f"a covariance needs at least 2 images, got {n}")
    mu = sum(feats[i : i + block].double().sum(0) for i in range(0, n, block)) / n
    cov = torch.zeros(feats.shape[1], feats.shape[1], dtype=torch.float64)
    for i in range(0, n, block):
        x = feats[i : i + block].double() - mu
        cov += x.T @ x
    return mu, cov / (n - 1)


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a.square().sum(1)[:, None] + b.square().sum(1)[None] - 2 * a @ b.T).clamp(min=0)


def _rows(m: int) -> int:
    return max(1, 2**24 // max(m, 1))  # about 128 MB of float64 distances at a time


def knn_radii(feats: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest other point."""
    n = feats.shape[0]
    if n <= k:
        raise QualityError(f"precision/recall with k={k} needs more than {k} images, got {n}")
    step = _rows(n)
    # the point itself is the nearest (distance 0): the k-th other one is the (k+1)-th smallest
    return torch.cat([torch.kthvalue(_sq_dist(feats[i : i + step], feats), k + 1, 1).values for i in range(0, n, step)])


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each point: inside the ball of at least one centre."""
    step = _rows(centres.shape[0])
    return torch.cat(
        [(_sq_dist(points[i : i + step], centres) <= radii[None]).any(1) for i in range(0, points.shape[0], step)]
    )


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: the share of samples inside the reference manifold (the union of balls
    reaching each reference point's k-th neighbour); recall: the share of reference points
    inside the samples' manifold."""
    precision = _covered(fake, real, knn_radii(real, k)).double().mean()
    recall = _covered(real, fake, knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def inception_score(logits: torch.Tensor, split_size: int = 5000) -> tuple[float, float]:
    """exp(E KL(p(y|x) || p(y))), p(y) per split of ``split_size`` images in order (ADM's
    splits): the mean and standard deviation over the splits."""
    scores = []
    for i in range(0, logits.shape[0], split_size):
        logp = torch.log_softmax(logits[i : i + split_size].double(), -1)
        log_marginal = torch.logsumexp(logp, 0) - math.log(logp.shape[0])
        scores.append(float((logp.exp() * (logp - log_marginal)).sum(1).mean().exp()))
    t = torch.tensor(scores, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(scores) > 1 else 0.0


# ---------------------------------------------------------------- the inputs


@dataclass
class Images:
    """Where images come from: ``batches(size)`` yields uint8 [b, 3, H, W]; ``labels`` are
    class ids (or None); ``recipe`` is the sampling recipe of a sample folder (or None)."""

    path: Path
    count: int
    labels: torch.Tensor | None = None
    recipe: Recipe | None = None
    npz: NpzImages | None = None
    files: list[Path] | None = None

    def batches(self, size: int):
        if self.npz is not None:
            for x in self.npz.batches(size):
                yield torch.from_numpy(x.copy()).permute(0, 3, 1, 2)
            return
        shape = None
        for i in range(0, self.count, size):
            arrs = []
            for p in self.files[i : i + size]:
                with Image.open(p) as im:
                    a = np.asarray(im.convert("RGB"))
                if shape is not None and a.shape != shape:
                    raise QualityError(f"{p}: {a.shape[1]}x{a.shape[0]} px, the first image is {shape[1]}x{shape[0]}")
                shape = a.shape
                arrs.append(a)
            yield torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)


def open_images(path) -> Images | tuple[torch.Tensor, torch.Tensor, dict]:
    """The images at ``path``, or the statistics (mu, sigma, their metadata) of a stats .npz."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST).is_file():
        m = read_manifest(path)
        if "npz" not in m["files"]:
            raise QualityError(f"{path}: a sample folder of codes only (its recipe has no tokenizer): no images")
        imgs = open_images(path / m["files"]["npz"])
        imgs.recipe = recipe_from_dict(m["recipe_spec"])
        return imgs
    if path.is_dir() and (path / RUN).is_file():  # a sample run that has not finished: a partial set
        raise QualityError(
            f"{path}: an unfinished sample run (no {MANIFEST} yet); run the same `flashar-adapt sample` command "
            "again to finish it, then evaluate"
        )
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(s.startswith(".") for s in p.parts)
        )
        if not files:
            raise QualityError(f"{path}: no image files in it")
        return Images(path, len(files), files=files)
    if not path.is_file():
        raise QualityError(f"{path}: no such file or folder")
    if path.suffix != ".npz":
        raise QualityError(f"{path}: give a folder of images, a sample folder or an .npz file")
    z = NpzImages(path)
    if "arr_0" not in z.keys:
        if {"mu", "sigma"} <= set(z.keys):
            meta = json.loads(str(z.array("meta"))) if "meta" in z.keys else {}
            return torch.from_numpy(z.array("mu")), torch.from_numpy(z.array("sigma")), meta
        raise NpzError(f"{path}: holds neither images (arr_0) nor statistics (mu, sigma); members: {z.keys}")
    labels = torch.from_numpy(z.array("arr_1")).long() if "arr_1" in z.keys else None
    return Images(path, len(z), labels=labels, npz=z)


@dataclass
class Features:
    feats: torch.Tensor  # [N, F] float32 (CPU)
    logits: torch.Tensor | None


@torch.no_grad()
def extract(images: Images, extractor: FeatureExtractor, batch: int = 100, progress: str | None = None) -> Features:
    """The extractor's features (and logits) of every image, in order."""
    dev = next(extractor.parameters(), torch.empty(0)).device
    feats, logits = [], []
    bar = tqdm(total=images.count, desc=progress or "", unit="img", disable=not progress)
    for x in images.batches(batch):
        f, lg = extractor(x.to(dev))
        feats.append(f.float().cpu())
        if lg is not None:
            logits.append(lg.float().cpu())
        bar.update(x.shape[0])
    bar.close()
    return Features(torch.cat(feats), torch.cat(logits) if logits else None)


STATS_MARKER = "flashar-adapt reference statistics"


def stats_target_problem(path) -> str | None:
    """Why the statistics file ``path`` may not be written, or None: an existing file is
    replaced only when it is statistics this toolkit wrote (its ``meta`` says so)."""
    path = Path(path)
    if not path.parent.is_dir():
        return f"{path}: the folder {path.parent} does not exist"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            ours = "meta" in z.files and json.loads(str(z["meta"])).get("written_by") == STATS_MARKER
    except (OSError, ValueError, AttributeError, zipfile.BadZipFile):
        ours = False
    return None if ours else f"{path} exists and is not statistics this toolkit wrote; refusing to replace it"


def save_stats(path, feats: torch.Tensor, extractor: str) -> None:
    """Mean and covariance of ``feats`` as a reference statistics .npz (``mu``, ``sigma``);
    an existing file only if it is statistics written here (``stats_target_problem``)."""
    problem = stats_target_problem(path)
    if problem:
        raise QualityError(problem)
    mu, sigma = mean_cov(feats)
    meta = np.array(json.dumps({"extractor": extractor, "num_images": int(feats.shape[0]), "written_by": STATS_MARKER}))

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
            np.savez(f, mu=mu.numpy(), sigma=sigma.numpy(), meta=meta)

    atomic_write(path, write)


def compare(samples: Features, reference, extractor: str, labels=None, classifies: bool = False) -> dict:
    """Every measure the inputs allow: ``reference`` is Features, or (mu, sigma, meta)."""
    out = {"extractor": extractor, "num_samples": int(samples.feats.shape[0])}
    mu, sigma = mean_cov(samples.feats)
    if isinstance(reference, Features):
        ref_mu, ref_sigma = mean_cov(reference.feats)
        out["num_reference"] = int(reference.feats.shape[0])
    else:
        ref_mu, ref_sigma, meta = reference
        if meta.get("extractor") not in (None, extractor):
            raise QualityError(
                f"the reference statistics are of the {meta['extractor']!r} extractor, not {extractor!r}"
            )
        out["num_reference"] = meta.get("num_images")
    if ref_mu.numel() != mu.numel():
        raise QualityError(
            f"the reference statistics have {ref_mu.numel()} features, the {extractor!r} extractor gives {mu.numel()}"
        )
    out["fid"] = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    if isinstance(reference, Features):
        out["precision"], out["recall"] = precision_recall(reference.feats, samples.feats)
    if samples.logits is not None:
        out["inception_score"], out["inception_score_std"] = inception_score(samples.logits)
        if classifies and labels is not None:
            out["accuracy"] = float((samples.logits.argmax(1) == labels).double().mean())
    return out
