"""Small copies of every ImageNet source layout, built from the same images so prepare's results can be compared.

The ImageNet-1k forms need all 1,000 classes (a missing class is an error), so each fixture holds one tiny
training image per class and a few validation images, each with distinct pixels.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from imagenet_resnet.data.classes import ilsvrc2012_ids, imagenet_classes


def tiny_jpeg(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class ImageNetLike:
    """1,000 training images (one per class) and `val_count` validation images with known classes."""

    def __init__(self, val_labels: list[int] | None = None, val_count: int = 30):
        self.classes = list(imagenet_classes())  # sorted WordNet IDs
        self.train = {wnid: [(f"{wnid}_1.JPEG", tiny_jpeg(i))] for i, wnid in enumerate(self.classes)}
        labels = val_labels if val_labels is not None else [(37 * k) % 1000 for k in range(val_count)]
        self.val = [(f"ILSVRC2012_val_{k + 1:08d}.JPEG", self.classes[label], tiny_jpeg(10_000 + k % 5000))
                    for k, label in enumerate(labels)]

    # The expected prepare result: (label, content hash) pairs per split, independent of names and order.
    def expected(self) -> dict[str, list]:
        train = sorted((self.classes.index(w), _sha(b)) for w, files in self.train.items() for _, b in files)
        val = sorted((self.classes.index(w), _sha(b)) for _, w, b in self.val)
        return {"train": train, "val": val}

    def folders(self, root: Path) -> Path:
        for wnid, files in self.train.items():
            (root / "train" / wnid).mkdir(parents=True)
            for name, data in files:
                (root / "train" / wnid / name).write_bytes(data)
        for name, wnid, data in self.val:
            (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
            (root / "val" / wnid / name).write_bytes(data)
        return root

    def official(self, root: Path, meta_mat: bool = True) -> Path:
        root.mkdir(parents=True)
        with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
            for wnid, files in self.train.items():
                inner = io.BytesIO()
                with tarfile.open(fileobj=inner, mode="w") as tar:
                    for name, data in files:
                        _add(tar, name, data)
                _add(outer, f"{wnid}.tar", inner.getvalue())
        with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
            for name, _, data in self.val:
                _add(tar, name, data)
        id_of = {wnid: k + 1 for k, wnid in enumerate(ilsvrc2012_ids())}
        truth = "".join(f"{id_of[wnid]}\n" for _, wnid, _ in self.val).encode()
        with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
            _add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
            if meta_mat:
                _add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", devkit_meta_mat())
        return root

    def kaggle(self, root: Path, solution_rows: list[tuple[str, str]] | None = None) -> Path:
        images = root / "ILSVRC" / "Data" / "CLS-LOC"
        for wnid, files in self.train.items():
            (images / "train" / wnid).mkdir(parents=True)
            for name, data in files:
                (images / "train" / wnid / name).write_bytes(data)
        (images / "val").mkdir(parents=True)
        for name, _, data in self.val:
            (images / "val" / name).write_bytes(data)
        names = imagenet_classes()
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {names[w]}\n" for w in self.classes))
        rows = solution_rows if solution_rows is not None else [(Path(n).stem, w) for n, w, _ in self.val]
        (root / "LOC_val_solution.csv").write_text(
            "ImageId,PredictionString\n" + "".join(f"{i},{w} 1 2 30 40 {w} 5 6 70 80 \n" for i, w in rows))
        return root

    def parquet(self, root: Path) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        root.mkdir(parents=True)
        train = [(name, data, self.classes.index(w)) for w, files in self.train.items() for name, data in files]
        val = [(name, data, self.classes.index(w)) for name, w, data in self.val]
        for file, rows in (("train-00000-of-00002.parquet", train[:600]), ("train-00001-of-00002.parquet", train[600:]),
                           ("validation-00000-of-00001.parquet", val)):
            table = pa.table({"image": [{"bytes": d, "path": n} for n, d, _ in rows], "label": [lb for _, _, lb in rows]})
            pq.write_table(table, root / file, row_group_size=256)
        return root


def devkit_meta_mat() -> bytes:
    """meta.mat as the devkit ships it: a `synsets` struct array, leaves (ILSVRC2012_ID 1..1000) first."""
    from scipy.io import savemat

    names = imagenet_classes()
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(k + 1, wnid, names[wnid], 0) for k, wnid in enumerate(ilsvrc2012_ids())]
    rows += [(1001, "n00001740", "entity", 3), (1002, "n00002137", "abstraction", 2)]  # inner nodes are skipped
    buf = io.BytesIO()
    savemat(buf, {"synsets": np.array(rows, dtype=dtype)})
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def prepared_pairs(data: Path, packed: bool = False) -> dict[str, list]:
    """(label, content hash) pairs per split of a prepared folder, read through its index."""
    from imagenet_resnet.data.index import ImageIndex
    from imagenet_resnet.data.prepared import index_path

    out = {}
    for split in ("train", "val"):
        index = ImageIndex.load(index_path(data, split, packed))
        out[split] = sorted((int(index.labels[i]), _sha(index.read(i))) for i in range(len(index)))
    return out
