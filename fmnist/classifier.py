"""A small CNN trained on the Fashion-MNIST training set: its penultimate layer is the
feature space of the Frechet distance, and its predictions score class-conditional samples."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from flashar_adapt.files import atomic_save_safetensors


class SmallCNN(nn.Module):
    def __init__(self, feat: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, feat)
        self.out = nn.Linear(feat, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: float images [N, 28, 28] in [0, 1] -> [N, feat]."""
        h = F.max_pool2d(F.relu(self.conv1(x[:, None] * 2 - 1)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x):
        return self.out(self.features(x))


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, x.shape[0], batch)])


def train_classifier(x, y, xt, yt, out: Path, epochs: int = 3, seed: int = 0) -> float:
    torch.manual_seed(seed)
    net = SmallCNN()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xf, xtf = x.float() / 255, xt.float() / 255
    for ep in range(epochs):
        perm = torch.randperm(x.shape[0])
        for i in tqdm(range(0, x.shape[0], 128), desc=f"classifier epoch {ep + 1}/{epochs}"):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(net(xf[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    acc = (batched(net, xtf).argmax(1) == yt).float().mean().item()
    atomic_save_safetensors(net.state_dict(), out)
    return acc


def load_classifier(path) -> SmallCNN:
    net = SmallCNN()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a [N, F] and b [M, F]:
    |mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.T

    ra = sqrtm(sa)
    cross = sqrtm(ra @ sb @ ra)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(sa + sb - 2 * cross))
