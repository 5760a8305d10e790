"""Exports the bundled offline fine-tuning dataset: scikit-learn's copy of the UCI optdigits test set.

1797 real handwritten digits (13 writers), 8x8 grayscale, values 0..16 (counts of ink pixels in 4x4 blocks
of a 32x32 bitmap). Source: E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits", UCI
Machine Learning Repository (1998), https://archive.ics.uci.edu/dataset/80, licensed CC BY 4.0.

The split is fixed and stratified: 100 images per class for training (1000), the other 797 for validation.

    pip install scikit-learn && python scripts/export_digits.py
    python scripts/export_digits.py --csv path/to/sklearn/datasets/data/digits.csv.gz   # without installing

Writes src/deltatune/vision/data/digits.npz (uint8 arrays: images (1797, 8, 8), labels (1797,),
validation (1797,) 0/1). No pickled objects: it loads with ``np.load(..., allow_pickle=False)``.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

OUTPUT = Path(__file__).resolve().parents[1] / "src" / "deltatune" / "vision" / "data" / "digits.npz"
TRAIN_PER_CLASS = 100
SPLIT_SEED = 0


def load_digits_arrays(csv_path: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 8, 8) uint8 in 0..16 and labels (N,) uint8, from scikit-learn or its CSV file."""
    if csv_path is None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images.astype(np.uint8), bunch.target.astype(np.uint8)
    with gzip.open(csv_path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    return table[:, :64].reshape(-1, 8, 8).astype(np.uint8), table[:, 64].astype(np.uint8)


def stratified_validation_mask(labels: np.ndarray, train_per_class: int, seed: int) -> np.ndarray:
    """1 for validation rows: all but ``train_per_class`` random rows of each class."""
    rng = np.random.default_rng(seed)
    validation = np.ones(len(labels), dtype=np.uint8)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        validation[rng.permutation(rows)[:train_per_class]] = 0
    return validation


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--csv", default=None, help="digits.csv.gz from a scikit-learn source tree or wheel")
    parser.add_argument("--output", default=str(OUTPUT))
    args = parser.parse_args()
    images, labels = load_digits_arrays(args.csv)
    if images.shape != (1797, 8, 8) or images.max() > 16:
        raise SystemExit(f"unexpected digits data: shape {images.shape}, max {images.max()}")
    validation = stratified_validation_mask(labels, TRAIN_PER_CLASS, SPLIT_SEED)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, images=images, labels=labels, validation=validation)
    print(f"wrote {args.output}: {int((validation == 0).sum())} train, {int(validation.sum())} validation")


if __name__ == "__main__":
    main()
