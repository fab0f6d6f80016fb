"""Real-learning check on real images available offline: Fashion-MNIST (Debian `dataset-fashion-mnist`).

    python -m projects.train.learning_check            # ~a few CPU minutes on 2 cores; extra flags go to train
    python -m projects.train.learning_check --max-steps 20   # shorter smoke

Trains the real ResNet-50 with the `fashion` preset of train.py, then compares the test top-1 accuracy with
what random weights get on the same test images, measured here (the untrained model, same seed).

Why random weights cannot pass: the 10 output rows of the final layer are initialised i.i.d., so the
distribution of an untrained network is symmetric under permuting the classes and its expected accuracy
on any image is exactly 1/10; a particular untrained network that predicts mostly one class scores about
that class's share of the test subset (about 10% on balanced Fashion-MNIST). The check asks for 50% top-1,
more than 40 binomial standard deviations (sqrt(0.1 * 0.9 / 1000) = 0.95%) above 10% on the 1,000 test
images, and prints both numbers. Exit 0 on pass, 1 on fail. The result goes to <out-dir>/learning_check.json
and, as a result record with provenance, to benchmarks/results/train_check.json, from which
`python -m benchmarks.report` writes the table in docs/train.md (`make train-check` does both).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from benchmarks.record import goal, make_record, write_record
from common.device import autocast_dtype
from projects.train import data, train
from projects.train.model import resnet50_cifar

THRESHOLD = 0.50


def len_eval(cfg: train.Config) -> int:
    return cfg.eval_limit or 10_000


@torch.no_grad()
def untrained_accuracy(cfg: train.Config) -> tuple[float, float]:
    """(top-1 of the untrained model, largest class share) on the check's test images, one process."""
    split = data.load_split(cfg.data, False, torch.device("cpu"), cfg.data_dir or None, limit=cfg.eval_limit)
    torch.manual_seed(cfg.seed)
    model = resnet50_cifar(split.num_classes).eval()
    amp = autocast_dtype(torch.device("cpu"), cfg.precision)   # the trained run's precision
    hits = 0
    for i in range(0, len(split.labels), 256):
        x = data.normalize(split.images[i:i + 256], cfg.data)
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            hits += (model(x).argmax(1) == split.labels[i:i + 256]).sum().item()
    share = torch.bincount(split.labels, minlength=split.num_classes).max().item() / len(split.labels)
    return hits / len(split.labels), share


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = train.parse_config(["--preset", "fashion", *argv])
    except SystemExit as e:  # a bad flag: parse_config has said why on one line
        return int(e.code or 0)
    rc = train.main(["--preset", "fashion", *argv])
    if rc:
        return rc
    evals = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    trained = [e for e in evals if "eval_top1" in e][-1]
    rand, share = untrained_accuracy(cfg)
    result = {"trained_top1": trained["eval_top1"], "trained_step": trained["step"], "untrained_top1": rand,
              "largest_class_share": share, "chance": 0.1, "threshold": THRESHOLD,
              "eval_images": cfg.eval_limit, "passed": trained["eval_top1"] >= THRESHOLD}
    (Path(cfg.out_dir) / "learning_check.json").write_text(json.dumps(result, indent=1))
    row = {"data": "fashion-mnist", "steps": trained["step"], "batch": cfg.batch_size,
           "precision": cfg.precision, "trained_top1": trained["eval_top1"], "untrained_top1": rand,
           "largest_class_share": share, "eval_images": len_eval(cfg)}
    units = {"data": "", "steps": "", "batch": "images", "precision": "", "trained_top1": "",
             "untrained_top1": "", "largest_class_share": "", "eval_images": "images"}
    rec = make_record("train_check", cfg, [row], [
        goal("fashion_mnist_top1", "ResNet-50 test top-1 after the fashion preset (untrained: ~1/10)",
             trained["eval_top1"], THRESHOLD)], units=units, columns=list(row), preset="fashion",
        notes=["Random weights expect 1/10 (classes are exchangeable at initialisation); 0.5 is > 40 binomial "
               "standard deviations above it on 1,000 test images."])
    write_record(rec)
    print(f"Fashion-MNIST test top-1 after {trained['step']} steps: {trained['eval_top1']:.3f}; untrained "
          f"weights: {rand:.3f}; largest class share: {share:.3f}; threshold {THRESHOLD} -> "
          f"{'PASS' if result['passed'] else 'FAIL'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
