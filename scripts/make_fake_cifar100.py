"""Write a small data set in the official `cifar-100-python` pickle format (train, test, meta), so the real
CIFAR-100 loading code (torchvision.datasets.CIFAR100) runs offline in tests. The images are not CIFAR:
each class gets its own mean colour plus noise, so a model can learn something from them.

    python scripts/make_fake_cifar100.py OUT_DIR [--train 512] [--test 128] [--seed 0]
    # then: python -m projects.train.train --data cifar100 --data-dir OUT_DIR ...
"""
from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import numpy as np


def _images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    colours = np.random.default_rng(1234).integers(30, 226, size=(100, 3))  # a fixed colour per class
    n = len(labels)
    img = colours[labels][:, :, None] + rng.normal(0, 40, size=(n, 3, 1024))  # (N, 3, 32*32)
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072)  # official row layout: R(1024) G B


def _dump(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    os.replace(tmp, path)


def write(out: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = Path(out) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, size=n)
        _dump({"filenames": [f"fake_{name}_{i}.png" for i in range(n)], "batch_label": f"fake {name} batch",
               "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
               "data": _images(rng, fine)}, folder / name)
    _dump({"fine_label_names": [f"class_{i}" for i in range(100)],
           "coarse_label_names": [f"super_{i}" for i in range(20)]}, folder / "meta")
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=512)
    p.add_argument("--test", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write(a.out, a.train, a.test, a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
