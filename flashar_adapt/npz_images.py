"""Images in the ``.npz`` layout of the ADM evaluator (guided-diffusion's
``evaluations/evaluator.py``, which LlamaGen and most class-conditional generators report
FID with): ``arr_0`` uint8 [N, H, W, 3]; ``arr_1`` int64 class ids [N] for class-conditional
samples (as ADM's ``image_sample`` writes them; the evaluator reads ``arr_0`` only).

Both directions stream: 50,000 images of 256x256 are 9.8 GB, never held in memory at once.
A sample file must hold no ``mu`` key: the ADM evaluator would take it for precomputed
Inception statistics and then also demand ``mu_s``/``sigma_s``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import InputError
from .files import atomic_write


class NpzError(InputError):
    """An .npz file that does not hold images in the expected layout."""


def write_npz(path, images: Iterable[np.ndarray], shape: tuple[int, int, int], labels=None) -> None:
    """Write ``images`` (uint8 [H, W, 3] each, exactly ``shape[0]`` of them) as ``arr_0`` of a new
    .npz at ``path`` (atomically: a failure leaves nothing half-written), and ``labels`` as
    ``arr_1``."""
    n, h, w = shape

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                header = {"descr": "|u1", "fortran_order": False, "shape": (n, h, w, 3)}
                np.lib.format.write_array_header_1_0(f, header)
                count = 0
                for img in images:
                    img = np.ascontiguousarray(img, dtype=np.uint8)
                    if img.shape != (h, w, 3):
                        raise NpzError(f"image {count} is {img.shape}, expected {(h, w, 3)}")
                    f.write(img.tobytes())
                    count += 1
                if count != n:
                    raise NpzError(f"{count} images written, {n} announced")
            if labels is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(labels, dtype=np.int64), allow_pickle=False)

    atomic_write(path, write)


class NpzImages:
    """Reads ``arr_0`` of an .npz a batch at a time (uint8 [N, H, W, C], C 3 or 1, or [N, H, W]);
    other members (``arr_1``, ``mu``, ``sigma``) whole with ``array``."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                self.keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                self.shape = self._header(zf) if "arr_0" in self.keys else None
        except (zipfile.BadZipFile, OSError) as e:
            raise NpzError(f"{self.path}: not a readable .npz file ({e})") from None

    def _header(self, zf: zipfile.ZipFile):
        with zf.open("arr_0.npy") as f:
            try:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
            except ValueError as e:
                raise NpzError(f"{self.path}: arr_0 is not a numpy array ({e})") from None
        if dtype != np.uint8 or fortran or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
            raise NpzError(
                f"{self.path}: arr_0 must be uint8 images [N, H, W, 3] in C order (the ADM layout), "
                f"got {dtype} {shape}{' in Fortran order' if fortran else ''}"
            )
        return shape

    def __len__(self) -> int:
        if self.shape is None:
            raise NpzError(f"{self.path}: no arr_0 (images) in it; members: {self.keys}")
        return self.shape[0]

    def array(self, key: str) -> np.ndarray:
        """One member, whole (small ones: labels, statistics)."""
        if key not in self.keys:
            raise NpzError(f"{self.path}: no {key!r} in it; members: {self.keys}")
        try:
            with np.load(self.path, allow_pickle=False) as z:
                return z[key]
        except (zipfile.BadZipFile, OSError, ValueError) as e:  # a damaged member: bad CRC, cut short
            raise NpzError(f"{self.path}: {key} is not readable ({e})") from None

    def batches(self, size: int) -> Iterator[np.ndarray]:
        """uint8 [b, H, W, 3] batches of ``size`` images (the last one shorter), in order."""
        n = len(self)
        h, w = self.shape[1:3]
        c = self.shape[3] if len(self.shape) == 4 else 1
        per = h * w * c
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            for start in range(0, n, size):
                b = min(size, n - start)
                try:
                    raw = f.read(b * per)
                except (zipfile.BadZipFile, OSError, EOFError) as e:  # zipfile checks the CRC as it reads
                    raise NpzError(f"{self.path}: arr_0 is damaged ({e})") from None
                if len(raw) != b * per:
                    raise NpzError(f"{self.path}: arr_0 ends after {start + len(raw) // per} of {n} images")
                x = np.frombuffer(raw, dtype=np.uint8).reshape(b, h, w, c)
                yield np.repeat(x, 3, axis=3) if c == 1 else x
