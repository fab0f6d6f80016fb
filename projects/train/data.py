"""Data on the device: whole splits as uint8 tensors, augmentation as batched tensor ops (airbench style).

No DataLoader workers: on a 2-core CPU they would compete with the training ranks, and on a GPU the whole
CIFAR-100 train split is 150 MB. Sources (`--data`):
- `cifar100`: torchvision.datasets.CIFAR100 from `--data-dir` (official `cifar-100-python` pickles);
  `--download` fetches it for users online. Offline nothing is ever downloaded unless asked.
- `fashion-mnist`: the IDX files of Debian's `dataset-fashion-mnist` (offline, real images), 28x28 grey
  zero-padded to 32x32 and repeated to 3 channels; 10 classes.
- `synthetic`: random tensors of the real shape, for throughput.

Order: one permutation of the train split per epoch, seeded by (seed, epoch) and independent of world size.
Training position is a GLOBAL sample cursor into that permutation: the step at cursor c consumes
perm[c : c + G] with G = world_size * batch_size * accum, laid out as (accum, world_size, batch_size), so
rank r's micro-step m gets perm[c + (m*W + r)*b : ... + b]. A run resumed at another world size picks up at
the same cursor and sees each remaining sample of the epoch exactly once. The last incomplete global batch of
an epoch is dropped (like DataLoader(drop_last=True)).
"""
from __future__ import annotations

import functools

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CIFAR100_HINT = ("pass --download to fetch CIFAR-100 (~170 MB from https://www.cs.toronto.edu/~kriz/"
                 "cifar.html) into --data-dir, or point --data-dir at a folder holding cifar-100-python/")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_HINT = "install it with `apt-get install dataset-fashion-mnist` or point --data-dir at the IDX files"

# Per-channel mean/std of the train split (CIFAR-100: the usual published values; Fashion-MNIST padded).
STATS = {
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion-mnist": ((0.2190,) * 3, (0.3318,) * 3),
    "synthetic": ((0.5,) * 3, (0.25,) * 3),
}


class DataError(Exception):
    """Missing or malformed data: reported as one line with the hint, never a traceback."""


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, 32, 32) uint8, on the device
    labels: torch.Tensor  # (N,) int64, on the device
    num_classes: int


def _cifar100(root: str, train: bool, download: bool) -> tuple[np.ndarray, list[int]]:
    from torchvision.datasets import CIFAR100

    class LocalCIFAR100(CIFAR100):
        # An existing copy is read with torchvision's own loader but without its md5 check, so files written
        # in the official format by scripts/make_fake_cifar100.py load too; --download verifies md5.
        train_list = [["train", None]]
        test_list = [["test", None]]
        meta = {**CIFAR100.meta, "md5": None}

    folder = Path(root) / "cifar-100-python"
    try:
        if download:
            ds = CIFAR100(root, train=train, download=True)
        else:
            if not (folder / ("train" if train else "test")).is_file() or not (folder / "meta").is_file():
                raise DataError(f"CIFAR-100 not found in {folder}; {CIFAR100_HINT}")
            ds = LocalCIFAR100(root, train=train, download=False)
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, OSError, RuntimeError) as e:
        raise DataError(f"CIFAR-100 in {folder} is malformed ({type(e).__name__}: {e}); {CIFAR100_HINT}") from e
    data = np.asarray(ds.data)
    if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1:] != (32, 32, 3) or len(ds.targets) != len(data):
        raise DataError(f"CIFAR-100 in {folder} is malformed (images {data.shape} {data.dtype}); {CIFAR100_HINT}")
    return data, list(ds.targets)


def _read_idx(path: Path) -> np.ndarray:
    """IDX format (big-endian header: magic 0x0000 08 ndim, then ndim uint32 sizes, then uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"bad IDX magic {raw[:4].hex()}")
        shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        arr = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(shape)
    except (OSError, EOFError, ValueError, struct.error, gzip.BadGzipFile) as e:
        raise DataError(f"Fashion-MNIST file {path} is malformed ({e}); {FASHION_HINT}") from e


def _fashion_mnist(root: str | None, train: bool) -> tuple[np.ndarray, np.ndarray]:
    folder = Path(root or FASHION_DIR)
    prefix = "train" if train else "t10k"
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [folder / f"{prefix}-{kind}.gz", folder / f"{prefix}-{kind}"]
        found = [p for p in cands if p.is_file()]
        if not found:
            raise DataError(f"Fashion-MNIST not found in {folder} (no {prefix}-{kind}[.gz]); {FASHION_HINT}")
        paths.append(found[0])
    images, labels = _read_idx(paths[0]), _read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
        raise DataError(f"Fashion-MNIST in {folder} is malformed (images {images.shape}); {FASHION_HINT}")
    # (N, 28, 28) -> zero-pad to (N, 32, 32) -> (N, 32, 32, 3) like the CIFAR arrays
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(images[..., None], 3, axis=-1), labels.astype(np.int64)


def load_split(name: str, train: bool, device: torch.device, data_dir: str | None = None,
               download: bool = False, limit: int = 0, synthetic_size: int = 50_000) -> Split:
    """One split of a data set as uint8 (N, 3, 32, 32) + int64 labels on `device`; `limit` keeps the first N."""
    if name == "synthetic":
        g = torch.Generator().manual_seed(1234 + int(train))
        n = limit or (synthetic_size if train else 10_000)
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 100, (n,), generator=g)
        return Split(images.to(device), labels.to(device), 100)
    if name == "cifar100":
        arr, targets = _cifar100(data_dir or "data", train, download)
        labels, num_classes = np.asarray(targets, dtype=np.int64), 100
    elif name == "fashion-mnist":
        arr, labels = _fashion_mnist(data_dir, train)
        num_classes = 10
    else:
        raise DataError(f"unknown data set {name!r}; choose cifar100, fashion-mnist or synthetic")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{name}: labels outside [0, {num_classes}) in {data_dir}")
    if limit:
        arr, labels = arr[:limit], labels[:limit]
    images = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return Split(images.to(device), torch.from_numpy(labels).to(device), num_classes)


def _mix(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (not hash(): stable across processes and versions)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & (2**63 - 1)


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    """The epoch's sample order: same for every rank and every world size (drawn on CPU, then moved)."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, 0))
    return torch.randperm(n, generator=g).to(device)


def step_indices(perm: torch.Tensor, cursor: int, world: int, rank: int, batch: int, accum: int) -> torch.Tensor:
    """This rank's sample indices for the step at global `cursor`: (accum, batch)."""
    g = world * batch * accum
    return perm[cursor:cursor + g].view(accum, world, batch)[:, rank]


def augment_params(seed: int, epoch: int, cursor: int, n: int, device: torch.device) -> torch.Tensor:
    """Crop offsets and flips for the n = G positions of one global step: (n, 3) int64 [dy, dx, flip].

    Drawn on the device from a generator seeded by (seed, epoch, cursor), so the augmentation of a sample is
    a function of where it sits in the epoch: no generator state to checkpoint, and the same whatever the
    world size or accumulation split.
    """
    g = torch.Generator(device=device).manual_seed(_mix(seed, epoch, cursor, 1))
    offs = torch.randint(0, 9, (n, 2), generator=g, device=device)
    flip = torch.randint(0, 2, (n, 1), generator=g, device=device)
    return torch.cat([offs, flip], dim=1)


def augment(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and horizontal flip, batched: x (B, 3, 32, 32) uint8."""
    B, C, H, W = x.shape
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))  # (B, 3, 40, 40)
    ar = torch.arange(H, device=x.device)
    rows = (params[:, 0:1] + ar)[:, None, :, None]  # (B, 1, 32, 1)
    cols = params[:, 1:2] + ar  # (B, 32)
    cols = torch.where(params[:, 2:3].bool(), cols.flip(1), cols)[:, None, None, :]  # flip = reversed columns
    bi = torch.arange(B, device=x.device)[:, None, None, None]
    ci = torch.arange(C, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]  # (B, 3, 32, 32)


@functools.cache
def _stats(name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) * 255 as (1, 3, 1, 1) tensors, made once per device: building them from Python lists
    on every step would be a blocking host-to-device copy (a host sync) on CUDA."""
    mean, std = STATS[name]
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalize(x: torch.Tensor, name: str, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalized; channels_last memory format when asked."""
    mean, std = _stats(name, x.device)
    out = (x.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def train_batch(split: Split, perm: torch.Tensor, cursor: int, epoch: int, seed: int, world: int, rank: int,
                batch: int, accum: int, do_augment: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's uint8 images (accum, b, 3, 32, 32), labels (accum, b) and augmentation for one step."""
    idx = step_indices(perm, cursor, world, rank, batch, accum)  # (K, b)
    x, y = split.images[idx], split.labels[idx]
    if do_augment:
        p = augment_params(seed, epoch, cursor, world * batch * accum, x.device)
        p = p.view(accum, world, batch, 3)[:, rank]  # (K, b, 3)
        x = augment(x.flatten(0, 1), p.flatten(0, 1)).view_as(x)
    return x, y

