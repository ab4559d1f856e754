"""A small real dataset for CPU checks: the first N training and M validation photos of each Imagenette class,
as symlinks in the same train/<wnid>/ val/<wnid>/ layout. tests/test_real_data.py trains on the same subset
that docs/accuracy.md measured its floor on:
    python benchmarks/imagenette_subset.py ../shared/data/imagenette2-224 /tmp/inette-small
    imagenet-resnet bench accuracy --data /tmp/inette-small --recipe small_cpu --seeds 0 1 2 3 4 \\
        --set train.deterministic=true --runs-dir /tmp/inette-small-runs --json small_cpu_subset.json
"""

import argparse
import os
from pathlib import Path

TRAIN_PER_CLASS, VAL_PER_CLASS = 300, 100


def make_subset(source: Path, out: Path, train_per_class: int = TRAIN_PER_CLASS,
                val_per_class: int = VAL_PER_CLASS) -> Path:
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for class_dir in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            (out / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.iterdir())[:count]:
                link = out / split / class_dir.name / image.name
                if not link.exists():
                    os.symlink(image.resolve(), link)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="an Imagenette tree (train/<wnid>/, val/<wnid>/)")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(make_subset(args.source, args.out))
