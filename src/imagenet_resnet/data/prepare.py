"""`imagenet-resnet prepare`: any ImageNet source -> a checked index, and optionally a packed copy.

1. The source is recognised and listed (sources.py), labels in sorted class-ID order.
2. Every image is checked in parallel: read, header parsed (by Pillow, shown only the formats training reads:
   untrusted_images.py), fully decoded at 1/8 scale (libjpeg still reads every byte, so truncation shows) and
   classified. Empty, truncated and unreadable files are left out of the index; PNGs named .JPEG, CMYK,
   grayscale and other modes stay in and are converted when loaded (or when packed). Nothing is dropped
   silently: each one is in problems.tsv and the summary.
3. With --pack: images are re-encoded once as RGB JPEG with the short side capped, into shard files of
   consecutive JPEGs plus an offset index (random access with one pread, exact shuffling). Shards are
   written in parallel, each atomically (storage/atomic.py), its record (the mark of a complete shard: sizes,
   SHA-256, what it was packed from; shards.py) last, so an interrupted run resumes at the first unfinished
   shard, and a later run packs again only the shards whose source images changed.

A source at a URL (s3://...: the official tars or parquet shards) is read in place, without a local copy, and
always packed: the images are fetched by byte range, a few hundred at a time, nearby ones in one request.
With --out at a URL, the folder is prepared in a local work folder and uploaded as it is written (upload.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import UserError, check_writable, disk_full_said
from ..storage import urls
from ..storage.atomic import atomic_file
from . import upload
from .classes import some_of
from .index import ImageIndex, short_name
from .prepared import (FORMAT, MANIFEST, SPLITS, STAGING, UNPACKED, finish_switch, index_path,
                       not_written_by_prepare, read_manifest, write_switch)
from .presets import unreadable_reason
from .shards import (AGAIN, CHANGED, DIGEST_BYTES, MISSING, UNRECORDED, add_digests, file_sha256, link_shard,
                     read_record, shard_path, shard_state, source_digest, write_record)
from .sources import Source, SourceError, open_source
from .untrusted_images import DATA_FORMATS, open_untrusted

# Problem kinds: those that leave an image out of the index, and those fixed by conversion.
EXCLUDED = ("empty", "truncated", "unreadable")
CONVERTED = ("not_jpeg", "cmyk", "grayscale", "other_mode")
KINDS = (None,) + EXCLUDED + CONVERTED  # position = the code stored per image


@dataclass
class PackSettings:
    short_side: int = 256  # cap on the shorter side, in pixels; 0 keeps every size
    quality: int = 90
    shard_images: int = 4096  # images per shard file

    def as_dict(self) -> dict:
        return {"short_side": self.short_side, "quality": self.quality, "shard_images": self.shard_images}


def inspect(data: bytes, name: str) -> tuple[str | None, str, int, int]:
    """(problem kind or None, detail, width, height) of one encoded image."""
    if not data:
        return "empty", unreadable_reason(data, ValueError()), 0, 0
    try:
        with open_untrusted(data, DATA_FORMATS) as img:
            width, height = img.size
            fmt, mode = img.format, img.mode
            if fmt == "JPEG":
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        kind = "truncated" if "truncated" in str(e) else "unreadable"
        return kind, unreadable_reason(data, e), 0, 0
    if fmt != "JPEG" and name.lower().endswith((".jpeg", ".jpg")):
        return "not_jpeg", f"a {fmt} file named .JPEG", width, height
    if mode == "CMYK":
        return "cmyk", "CMYK colours", width, height
    if mode in ("L", "LA", "I;16", "I", "1"):
        return "grayscale", f"mode {mode}", width, height
    if mode != "RGB":
        return "other_mode", f"mode {mode}", width, height
    return None, "", width, height


# --- worker side: the index is handed over once per process ------------------------------------------------

_worker: dict = {}


def _init_worker(state: dict, counter) -> None:
    _worker.update(state, counter=counter)


def _init_pool_worker(state: dict, counter) -> None:
    # Ctrl-C reaches the whole process group: the parent alone handles it (leaving the pool ends the workers),
    # so the user sees one line instead of a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(state, counter)


def _count(n: int) -> None:
    with _worker["counter"].get_lock():
        _worker["counter"].value += n


def _images(index: ImageIndex, start: int, stop: int, batch: int = 256):
    """(position, bytes or the OSError reading them raised) of images start..stop-1, `batch` read at once."""
    for first in range(start, stop, batch):
        positions = range(first, min(first + batch, stop))
        yield from zip(positions, index.read_many(positions))


def _check_chunk(bounds: tuple[int, int]):
    index, start, stop = _worker["index"], bounds[0], bounds[1]
    codes = np.zeros(stop - start, np.uint8)
    sizes = np.zeros((stop - start, 2), np.int32)
    digests = np.zeros((stop - start, DIGEST_BYTES), np.uint8)
    details = {}
    for k, (i, data) in enumerate(_images(index, start, stop)):
        digests[k] = np.frombuffer(source_digest(index.names[i], int(index.labels[i]), data), np.uint8)
        if isinstance(data, OSError):
            kind, detail, w, h = "unreadable", f"{type(data).__name__}: {data}", 0, 0
        else:
            kind, detail, w, h = inspect(data, os.fsdecode(index.names[i]))
        codes[k], sizes[k] = KINDS.index(kind), (w, h)
        if kind:
            details[i] = detail
        if k % 32 == 31:
            _count(32)
    _count((stop - start) % 32)
    return start, codes, sizes, details, digests


def encode_for_pack(data: bytes, kind: str | None, settings: PackSettings) -> bytes:
    """The bytes to store: the original when it is already a clean RGB JPEG within the size cap (no second
    generation of JPEG loss), else a re-encode as RGB JPEG with the short side capped."""
    with open_untrusted(data, DATA_FORMATS) as img:
        width, height = img.size
        cap = settings.short_side
        scale = cap / min(width, height) if cap and min(width, height) > cap else 1.0
        if kind is None and img.format == "JPEG" and scale == 1.0:
            return data
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        if img.format == "JPEG" and scale < 0.5:
            img.draft("RGB", target)  # DCT-scaled decode to at least the target size: far less work
        img = img.convert("RGB")
        if img.size != target:
            img = img.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=settings.quality)
        return out.getvalue()


def _pack_shard(shard: int):
    index, settings, out_dir, split = _worker["index"], _worker["settings"], _worker["out_dir"], _worker["split"]
    start = shard * settings.shard_images
    stop = min(start + settings.shard_images, len(index))
    bin_path, part_path = shard_path(out_dir, split, shard, ".bin"), shard_path(out_dir, split, shard, ".bin.part")
    sizes = np.zeros(stop - start, np.int64)
    sources = np.zeros((stop - start, DIGEST_BYTES), np.uint8)
    failed, sha256 = {}, hashlib.sha256()
    with atomic_file(bin_path, temp=part_path, again=AGAIN) as f:
        for k, (i, data) in enumerate(_images(index, start, stop)):
            sources[k] = np.frombuffer(source_digest(index.names[i], int(index.labels[i]), data), np.uint8)
            try:
                if isinstance(data, OSError):
                    raise data
                blob = encode_for_pack(data, _worker["kinds"][i], settings)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                failed[i] = f"{type(e).__name__}: {e}"  # passed the check, failed now: reported, left out
                blob = b""
            f.write(blob)
            sha256.update(blob)
            sizes[k] = len(blob)
            if k % 32 == 31:
                _count(32)
    _count((stop - start) % 32)
    write_record(out_dir, split, shard, sizes, failed, sources, sha256.hexdigest())  # last: the shard is complete
    return shard


def _run_parallel(fn, tasks, total: int, workers: int, state: dict, desc: str):
    """Run fn over tasks in `workers` processes, each given `state` once; a progress bar counts images,
    with rate and ETA."""
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counter = context.Value("q", 0)
    results = []
    with tqdm(total=total, desc=desc, unit="img", smoothing=0.1, mininterval=0.5 if sys.stderr.isatty() else 30,
              file=sys.stderr) as bar:
        if workers <= 1:
            _init_worker(state, counter)
            for task in tasks:
                results.append(fn(task))
                bar.update(counter.value - bar.n)
            return results
        with context.Pool(workers, initializer=_init_pool_worker, initargs=(state, counter)) as pool:
            pending = pool.map_async(fn, tasks, chunksize=1)
            while not pending.ready():
                pending.wait(0.5)
                bar.update(counter.value - bar.n)
            results = pending.get()
            bar.update(counter.value - bar.n)
    return results


# --- the driver ---------------------------------------------------------------------------------------------

def limit_per_class(index: ImageIndex, n: int) -> ImageIndex:
    """The first n images of each class, in index order."""
    order = np.argsort(index.labels, kind="stable")
    starts = np.searchsorted(index.labels[order], np.arange(len(index.classes)))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - starts[index.labels[order]]
    return index.subset(np.flatnonzero(rank < n))


def check_split(index: ImageIndex, workers: int, desc: str):
    """(codes, sizes, details, source digests) for every image, checked in parallel."""
    chunk = 1024 if index.storage == "parquet" else 256  # parquet: fewer re-reads of one row group
    tasks = [(s, min(s + chunk, len(index))) for s in range(0, len(index), chunk)]
    results = _run_parallel(_check_chunk, tasks, len(index), workers, {"index": index}, desc)
    codes, sizes, details = np.zeros(len(index), np.uint8), np.zeros((len(index), 2), np.int32), {}
    digests = np.zeros((len(index), DIGEST_BYTES), np.uint8)
    for start, c, s, d, g in results:
        codes[start : start + len(c)], sizes[start : start + len(c)], digests[start : start + len(c)] = c, s, g
        details.update(d)
    return codes, sizes, details, digests


def estimate_pack(index: ImageIndex, kinds: list, settings: PackSettings,
                  samples: int = 200) -> tuple[float, float, int]:
    """(bytes per image, seconds per image on one core, images sampled), from packing an even sample."""
    if index.storage == "parquet":  # rows are read a row group at a time: sample the first ones
        picks = np.arange(min(samples, len(index)))
    else:
        picks = np.unique(np.linspace(0, len(index) - 1, min(samples, len(index))).astype(np.int64))
    started, total = time.perf_counter(), 0
    for i, data in zip(picks, index.read_many(picks)):
        try:
            total += len(encode_for_pack(data, kinds[i], settings)) if not isinstance(data, OSError) else 0
        except (OSError, ValueError, SyntaxError):
            pass
    return total / len(picks), (time.perf_counter() - started) / len(picks), len(picks)


def about_duration(seconds: float) -> str:
    """A duration as people say it: seconds under a minute (never "0.0 min"), minutes, then hours."""
    if seconds < 60:
        return f"about {max(1, round(seconds))} s"
    return f"about {seconds / 60:.0f} min" if seconds < 5400 else f"about {seconds / 3600:.1f} h"


@dataclass
class ShardPlan:
    """What a packing does with each shard of a split."""
    keep: dict[int, Path]  # shard -> the folder holding it complete and packed from these very images
    unrecorded: list[int]  # kept, packed by a version that recorded no digests: they are added
    changed: dict[int, list[int]]  # shard -> its images (positions in the index) changed since it was packed
    missing: list[int]  # not complete anywhere

    def todo(self) -> list[int]:
        return sorted([*self.changed, *self.missing])


def plan_split(packed_dir: Path, earlier: Path | None, split: str, sources: np.ndarray, shard_images: int) -> ShardPlan:
    """Which shards of `packed_dir`, or else of `earlier` (the packed copy in place), are complete and packed from
    the images whose source digests are `sources` (from the check), and which are to be written."""
    plan = ShardPlan({}, [], {}, [])
    for k in range(-(-len(sources) // shard_images)):
        wanted = sources[k * shard_images : (k + 1) * shard_images]
        state, record, where = *shard_state(packed_dir, split, k, wanted), packed_dir
        if state in (MISSING, CHANGED) and earlier is not None:
            found = shard_state(earlier, split, k, wanted)
            if found[0] != MISSING:
                (state, record), where = found, earlier
        if state == CHANGED:
            differ = np.flatnonzero((record["sources"] != wanted).any(axis=1))
            plan.changed[k] = (k * shard_images + differ).tolist()
        elif state == MISSING:
            plan.missing.append(k)
        else:
            plan.keep[k] = where
            if state == UNRECORDED:
                plan.unrecorded.append(k)
    return plan


def _say_plan(index: ImageIndex, plan: ShardPlan, split: str, packed_dir: Path) -> None:
    shards = len(plan.keep) + len(plan.changed) + len(plan.missing)
    # Shards kept from the staging folder are a killed packing's work, resumed (a finished folder's are just kept)
    resumed = sum(where == packed_dir for where in plan.keep.values()) if packed_dir.parent.name == STAGING else 0
    if plan.changed:
        changed = [index.describe(i) for positions in plan.changed.values() for i in positions]
        print(f"  {split}: {len(changed)} of its images changed at their source since they were packed "
              f"({some_of(changed)}): re-packing the {len(plan.changed)} of {shards} shards holding them",
              file=sys.stderr)
    elif resumed:
        print(f"  {split}: {resumed} of {shards} shards already written; resuming", file=sys.stderr)
    if plan.unrecorded:
        print(f"  {split}: {len(plan.unrecorded)} of {shards} shards in {packed_dir} were packed by an earlier "
              "version, which recorded no digests: adding them (reading the shards once; their sources are taken as "
              "they are now)", file=sys.stderr)


def pack_split(index: ImageIndex, kinds: list, settings: PackSettings, out_dir: Path, split: str, workers: int,
               sources: np.ndarray, plan: ShardPlan):
    """Write the shards `plan` says are to be written (the rest linked in from where it keeps them), then the
    packed index over all of them. Returns it, the images that failed to pack, and each shard's SHA-256."""
    n = settings.shard_images
    for k, where in plan.keep.items():
        if where != out_dir:
            link_shard(where, out_dir, split, k)
    _say_plan(index, plan, split, out_dir)
    todo = plan.todo()
    images_todo = sum(min(n, len(index) - k * n) for k in todo)
    state = {"index": index, "settings": settings, "out_dir": out_dir, "split": split, "kinds": kinds}
    _run_parallel(_pack_shard, todo, images_todo, workers, state, f"pack {split}")
    add_digests(out_dir, split, plan.unrecorded, [sources[k * n : (k + 1) * n] for k in plan.unrecorded], workers)
    shards = -(-len(index) // n)
    records = [read_record(out_dir, split, k) for k in range(shards)]
    sizes = np.concatenate([r["sizes"] for r in records])
    failed = {i: why for r in records for i, why in r["failed"].items()}
    file_ids = np.arange(len(index)) // n
    starts = np.zeros(len(index), np.int64)
    for k in range(shards):
        in_shard = file_ids == k
        starts[in_shard] = np.concatenate([[0], np.cumsum(sizes[in_shard])[:-1]])
    packed = ImageIndex("ranges", out_dir, index.names, index.labels, index.classes,
                        files=[shard_path(out_dir, split, k, ".bin").name for k in range(shards)],
                        file_ids=file_ids.astype(np.int32), offsets=starts, sizes=sizes)
    keep = sizes > 0
    packed = packed.subset(keep) if not keep.all() else packed
    packed.save(out_dir / f"{split}.index.npz")
    return packed, failed, [r["sha256"] for r in records]


def _print_summary(source: Source, indexes: dict, counts: dict, problems: list, out: Path, packed_bytes: int | None,
                   limit: int) -> None:
    lines = [f"prepared {source.kind} source {source.path} -> {out}"]
    for split in counts:
        c, empty = counts[split], indexes[split].empty_classes()
        lines.append(f"  {split}: {c['images']:,} images in {len(source.classes) - len(empty)} "
                     + (f"of {len(source.classes)} classes (none of {some_of(empty)})" if empty else "classes")
                     + (f", {c['excluded']} left out" if c["excluded"] else ""))
    if limit:
        lines.append(f"  --limit-per-class {limit}: the first {limit} images of each class, in train and in val alike")
    if packed_bytes is not None:
        lines.append(f"  packed: {packed_bytes / 1e9:.2f} GB in {out / 'packed'}")
    elif (out / "packed").is_dir():  # never deleted here: it may be the only copy of hours of packing
        lines.append(f"  {out / 'packed'}: {_folder_bytes(out / 'packed') / 1e9:.2f} GB (its files' sizes) left by an "
                     "earlier --pack, now unused as this prepare did not pack: delete it to free the space, or "
                     "prepare again with --pack to use it")
    if problems:
        by_kind: dict = {}
        for row in problems:
            by_kind.setdefault((row[2], row[3]), []).append(row[1])
        lines.append(f"  {len(problems)} files needed attention (all listed in {out / 'problems.tsv'}):")
        for (kind, action), where in sorted(by_kind.items()):
            lines.append(f"    {len(where):6d} {kind:11s} {action}: {', '.join(short_name(w) for w in where[:3])}"
                         + (", ..." if len(where) > 3 else ""))
    else:
        lines.append("  no bad files found")
    print("\n".join(lines))


def prepare(source_path: str | Path, out: str | Path, pack: bool = False, settings: PackSettings | None = None,
            limit: int = 0, workers: int = -1, val_only: bool = False, work_dir: str | Path | None = None) -> dict:
    """Check and index the source (and pack it) into `out`, all or nothing: everything is checked before
    anything is written, new files are written beside the old ones (DATA/.prepare-staging/), and they replace
    the old ones only when all are complete. Killed or failed, it leaves the previous preparation as it was;
    run again with the same settings, it resumes packing at the first unfinished shard.

    `out` at a URL: the same, in the local `work_dir`, each shard uploaded as soon as it is written and the
    manifest last (data/upload.py)."""
    if urls.is_url(out):
        return _prepare_to_url(source_path, out, pack, settings, limit, workers, val_only, work_dir)
    _check_out(Path(out), "--out")
    return _prepare_here(source_path, Path(out), pack, settings, limit, workers, val_only)


def _check_out(out: Path, option: str) -> None:
    """Before any long work: `out` is a folder a prepare may fill (new, empty, or an earlier prepare's, maybe
    interrupted), and it can be written to. A folder of other files is refused: the switch would replace a
    packed/ or problems.tsv of the user's, or mix our files into theirs."""
    foreign = not_written_by_prepare(out)
    if foreign:
        raise UserError(f"{option} {out}: holds {len(foreign)} entries that `imagenet-resnet prepare` did not write "
                        f"({some_of(foreign)}) and would replace or mix with; give {option} a new or empty folder, "
                        "or the folder of an earlier prepare")
    check_writable(out, option)


def _prepare_to_url(source_path, url: str, pack: bool, settings, limit: int, workers: int, val_only: bool,
                    work_dir) -> dict:
    url = urls.check_url(url)
    if not pack:
        raise UserError(f"--out {url}: a prepared folder goes to object storage only packed (training reads the "
                        "packed copy); add --pack")
    work = Path(work_dir) if work_dir else upload.default_work_dir(url)
    _check_out(work, "--work-dir")
    print(f"--out {url}: packing in the work folder {work} (--work-dir), each shard uploaded once written",
          file=sys.stderr)
    with upload.Uploader(url, work) as uploader:
        manifest = _prepare_here(source_path, work, pack, settings, limit, workers, val_only, uploader)
        uploader.finish()
    return manifest


def _prepare_here(source_path, out: Path, pack: bool, settings: PackSettings | None, limit: int, workers: int,
                  val_only: bool, uploader=None) -> dict:
    settings = settings or PackSettings()
    workers = workers if workers > 0 else min(len(os.sched_getaffinity(0)), 32)
    if urls.is_url(source_path):
        urls.check_url(source_path)  # a URL holding credentials is refused before it is printed anywhere
        if not pack:
            raise UserError(f"{source_path}: a source at a URL is prepared with --pack (training reads the packed "
                            "copy on this machine, never the store image by image)")
    source = open_source(source_path, val_only, unpack_dir=out / UNPACKED)  # --out URL: `out` is the work folder
    if uploader is not None:
        _refuse_links_leaving(source, uploader.url)
    finish_switch(out)  # a switch an earlier prepare began is finished first: its files were complete
    print(f"{source_path}: {source.kind} layout, {len(source.classes)} classes", file=sys.stderr)
    if not pack and any(index.storage == "parquet" for index in source.splits.values()):
        pack = True  # a parquet row cannot be read on its own quickly: training reads the packed copy
        print(f"{source_path}: parquet shards are always packed (training reads images one by one, which parquet "
              "cannot do quickly), as with --pack", file=sys.stderr)
    for note in source.notes:
        print(f"  {note}", file=sys.stderr)
    _say_empty_classes(source, "val", source.splits["val"])
    indexes, kinds_of, sources_of, counts, problems = _check_splits(source, limit, pack, workers)
    with disk_full_said(out, AGAIN, name_the_failed_file=True):
        packed_info, packed_bytes = None, None
        if pack:
            packed_info, packed_bytes = _pack(source_path, out, indexes, kinds_of, sources_of, counts, problems,
                                              settings, limit, workers, uploader)
        manifest = {
            "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": {"kind": source.kind, "path": _where(source_path)},
            "classes": source.classes, "class_names": source.names, "limit_per_class": limit,
            "splits": counts, "problems": {k: sum(1 for p in problems if p[2] == k) for k in EXCLUDED + CONVERTED},
            "packed": packed_info,
        }
        _stage(out / STAGING, indexes, problems, manifest)
    write_switch(out, [index_path(Path(), s).name for s in SPLITS if s not in indexes])
    _print_summary(source, indexes, counts, problems, out, packed_bytes, limit)
    return manifest


def _refuse_links_leaving(source: Source, url: str) -> None:
    """Before a packed copy is uploaded: no image may be read through a link that leads out of the folder its
    index reads from. Locally, links are followed (a subset made of links, as benchmarks/imagenette_subset.py makes
    one, is a way to prepare part of a dataset, and the packed copy stays on this machine); but a tree made
    elsewhere could link to any photo of this machine's, and the upload would publish it. The folder itself is
    resolved first, so a link given as the source, or as its train/, is followed."""
    for index in source.splits.values():
        if index.storage != "files":
            continue  # an archive's members or parquet rows: read from the files the user named, never through links
        root, real_folders = Path(index.root).resolve(), {}
        for i in range(len(index)):
            path = index.path(i)
            folder = os.path.dirname(path)
            if folder not in real_folders:
                real_folders[folder] = Path(folder).resolve()
            real = Path(path).resolve() if os.path.islink(path) else real_folders[folder]
            if not real.is_relative_to(root):
                raise UserError(f"{index.describe(i)}: a link to {real}, outside {root}; prepare does not upload "
                                f"what links lead to (to {url}): copy the files in (cp -rL), or prepare locally "
                                "with --out DATA")


def _where(source_path) -> str:
    """The source as the manifest records it: an absolute path, or the URL."""
    if urls.is_url(source_path):
        return urls.check_url(source_path)
    return str(Path(source_path).resolve())


def _stage(stage: Path, indexes: dict, problems: list, manifest: dict) -> None:
    """The new index files, problems.tsv and manifest, beside the old ones until the switch."""
    stage.mkdir(parents=True, exist_ok=True)
    for split, index in indexes.items():
        index.save(stage / index_path(Path(), split).name)
    with open(stage / "problems.tsv", "w") as f:
        f.write("split\twhere\tkind\taction\tdetail\n")
        f.writelines("\t".join(str(x).replace("\t", " ").replace("\n", " ") for x in row) + "\n" for row in problems)
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _check_splits(source: Source, limit: int, pack: bool, workers: int):
    """Check every image of both splits: the indexes of the images kept, their kinds and source digests, counts,
    and the problems."""
    problems, counts, indexes, kinds_of, sources_of = [], {}, {}, {}, {}
    for split in (s for s in SPLITS if s in source.splits):
        index = source.splits[split]
        if limit:
            index = limit_per_class(index, limit)
        codes, _, details, sources = check_split(index, workers, f"check {split}")
        kinds = [KINDS[c] for c in codes]
        for i in np.flatnonzero(codes):
            action = "left out" if kinds[i] in EXCLUDED else ("re-encoded as RGB JPEG" if pack else "converted to RGB when loaded")
            problems.append((split, index.describe(int(i)), kinds[i], action, details[int(i)]))
        keep = np.array([k not in EXCLUDED for k in kinds], dtype=bool)
        indexes[split] = index.subset(keep)
        kinds_of[split] = [k for k in kinds if k not in EXCLUDED]
        sources_of[split] = sources[keep]
        counts[split] = {"images": int(keep.sum()), "excluded": int((~keep).sum())}
        if counts[split]["images"] == 0:
            raise SourceError(f"{source.path}: no readable {split} images")
        _say_empty_classes(source, split, indexes[split], listed=index)
    return indexes, kinds_of, sources_of, counts, problems


def _say_empty_classes(source: Source, split: str, index: ImageIndex, listed: ImageIndex | None = None) -> None:
    """Warn of the classes without images in `index` (after the image check: those that `listed`, the index
    as listed, still had images of). A class without validation images leaves its accuracy unmeasured, but
    the rest still counts (a partial download of the validation shards, say). A class without training images
    stops the prepare, as the model could never learn it: the sources refuse such a listing, and here what the
    image check emptied."""
    had = set(listed.empty_classes()) if listed is not None else set()
    empty = [c for c in index.empty_classes() if c not in had]
    if not empty:
        return
    readable = "readable " if listed is not None else ""
    what = (f"{source.path}: {len(empty)} of {len(index.classes)} classes have no {readable}{split} images "
            f"({some_of(empty)})")
    if split == "train":
        raise SourceError(f"{what}; a model cannot learn a class it never sees: replace their empty, truncated or "
                          "unreadable files, or remove the classes")
    warnings.warn(f"{what}; validation accuracy will not cover them")


def _pack(source_path, out: Path, indexes, kinds_of, sources_of, counts, problems: list, settings: PackSettings,
          limit: int, workers: int, uploader=None) -> tuple[dict, int]:
    """Write the packed copy of the splits. DATA/packed is only ever completed where it stands (its shards' digests
    added): when it holds these very images with these very settings and nothing is to be written. Otherwise
    the shards go beside it, into the staging folder (resuming there), those of DATA/packed still packed from
    the same images linked in, not packed again. Adds what failed to `problems`; returns the manifest's
    `packed` entry and the bytes written."""
    wanted = {**settings.as_dict(), "source": _where(source_path), "limit_per_class": limit,
              "images": {s: counts[s]["images"] for s in indexes}}
    in_place, staged = out / "packed", out / STAGING / "packed"
    if _pack_settings(staged) not in (None, wanted):  # an abandoned packing with other settings
        shutil.rmtree(staged)
    earlier = in_place if _pack_settings(in_place) == wanted else None
    plans = {s: plan_split(staged, earlier, s, sources_of[s], settings.shard_images) for s in indexes}
    todo = {s: sum(min(settings.shard_images, counts[s]["images"] - k * settings.shard_images)
                   for k in plans[s].todo()) for s in indexes}
    packed_dir = in_place if earlier is not None and not staged.exists() and not any(todo.values()) else staged
    if any(todo.values()):
        _check_room(out, packed_dir, indexes, kinds_of, todo, settings, workers)
    packed_dir.mkdir(parents=True, exist_ok=True)
    (packed_dir / "settings.json").write_text(json.dumps(wanted, indent=1))
    if uploader is not None:
        uploader.watch(packed_dir)  # each shard goes up as soon as it is complete
    packed_bytes, splits_info = 0, {}
    for split in indexes:
        packed, failed, digests = pack_split(indexes[split], kinds_of[split], settings, packed_dir, split, workers,
                                             sources_of[split], plans[split])
        for i, detail in failed.items():
            problems.append((split, indexes[split].describe(i), "unreadable", "left out", detail))
        packed_bytes += int(packed.sizes.sum())
        splits_info[split] = {"images": len(packed), "bytes": int(packed.sizes.sum()), "shards": len(packed.files),
                              "sha256": digests}
    return {**settings.as_dict(), "splits": splits_info}, packed_bytes


def _check_room(out: Path, packed_dir: Path, indexes, kinds_of, todo: dict, settings: PackSettings,
                workers: int) -> None:
    """Say what packing the `todo` images of each split will take, estimated from packing a sample, and refuse
    when the disk has not room for it."""
    first = next(s for s in indexes if todo[s])
    per_image, seconds, sampled = estimate_pack(indexes[first], kinds_of[first], settings)
    images = sum(todo.values())
    estimate = per_image * images
    free = shutil.disk_usage(next(p for p in (packed_dir, *packed_dir.parents) if p.exists())).free
    print(f"packing {images:,} images, short side <= {settings.short_side or 'any'} px, quality "
          f"{settings.quality}: about {estimate / 1e9:.2f} GB on disk ({free / 1e9:.1f} GB free), "
          f"{about_duration(seconds * images / workers)} with {workers} processes (both from packing {sampled} "
          f"{first} images as a sample)", file=sys.stderr)
    if estimate > free * 0.95:
        raise SourceError(f"{out}: about {estimate / 1e9:.1f} GB needed for the packed copy but {free / 1e9:.1f} GB "
                          "free (an older packed copy stays until the new one is complete); free space, lower "
                          "--short-side, or pack elsewhere with --out")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _pack_settings(packed_dir: Path) -> dict | None:
    try:
        return json.loads((packed_dir / "settings.json").read_text())
    except (OSError, ValueError):
        return None


def _check_containers(index: ImageIndex) -> list[str]:
    """Each file (or object, at a URL) that a ranges index reads from exists and holds every byte range."""
    found = []
    for k, name in enumerate(index.files):
        file = urls.join(index.root, name)
        if not urls.exists(file):
            found.append(f"{file}: missing")
            continue
        ends = index.offsets[index.file_ids == k] + index.sizes[index.file_ids == k]
        if len(ends) and ends.max() > urls.size(file):
            found.append(f"{file}: shorter than its index says ({urls.size(file)} < {ends.max()} bytes)")
    return found


def verify(data: str | Path, workers: int = -1) -> list[str]:
    """Re-check a prepared folder: indexes load and agree with the manifest, every byte range lies inside
    its file, every image decodes, every shard has the SHA-256 recorded when it was written, and every packed
    image is still what its source holds. Returns the problems found (empty when all is well)."""
    data = Path(data)
    workers = workers if workers > 0 else min(len(os.sched_getaffinity(0)), 32)
    manifest = read_manifest(data)
    if manifest is None:
        raise UserError(f"{data}: no {MANIFEST}; this folder was not made by `imagenet-resnet prepare`")
    found = []
    packed = manifest.get("packed")
    if packed and any("sha256" not in info for info in packed["splits"].values()):
        print(f"{data}: packed by an earlier version, which recorded no shard digests: a shard damaged without a "
              f"change of size, or a photo replaced since it was packed, goes unseen; to add them, "
              f"{_same_prepare(data, manifest)} (it reads the shards once and re-packs none)", file=sys.stderr)
    for split in manifest["splits"]:
        checked = _verify_index(data, manifest, split, False, workers, found)
        if packed and checked is not None:
            found += _changed_since_packed(data, manifest, split, *checked)
        if packed and _verify_index(data, manifest, split, True, workers, found) is not None:
            found += _damaged_shards(data, packed["splits"][split].get("sha256"), split, workers, manifest)
    return found


def _verify_index(data: Path, manifest: dict, split: str, packed: bool, workers: int, found: list):
    """Check one index of a prepared folder, adding what is wrong to `found`; (the index, the check's codes and
    source digests), or None where its files are missing."""
    path = index_path(data, split, packed)
    if not path.exists():
        found.append(f"{path}: missing")
        return None
    index = ImageIndex.load(path)
    if index.classes != manifest["classes"]:
        found.append(f"{path}: its class list differs from {MANIFEST}'s")
    expected = manifest["packed"]["splits"][split]["images"] if packed else manifest["splits"][split]["images"]
    if len(index) != expected:
        found.append(f"{path}: {len(index)} images, {MANIFEST} says {expected}")
    if index.storage == "ranges":
        missing = _check_containers(index)
        found += missing
        if missing:
            return None
    codes, _, details, sources = check_split(index, workers, f"verify {split}{' (packed)' if packed else ''}")
    for i in np.flatnonzero(np.isin(codes, [KINDS.index(k) for k in EXCLUDED])):
        found.append(f"{index.describe(int(i))}: {KINDS[codes[i]]} ({details[int(i)]})")
    return index, codes, sources


def _changed_since_packed(data: Path, manifest: dict, split: str, index: ImageIndex, codes: np.ndarray,
                          sources: np.ndarray) -> list[str]:
    """The images of the split whose source (as the index over the original files reads it now) differs from
    what their shard was packed from, in one line; nothing where the shards' records hold no digests (packed by
    an earlier version, or a copy fetched without its records)."""
    n, changed = manifest["packed"]["shard_images"], []
    for k in range(-(-len(index) // n)):
        record = read_record(data / "packed", split, k)
        if record is None or record["sources"] is None or len(record["sources"]) != len(sources[k * n : (k + 1) * n]):
            continue
        # an unreadable source is a problem of its own, said already
        readable = ~np.isin(codes[k * n : (k + 1) * n], [KINDS.index(kind) for kind in EXCLUDED])
        differ = (record["sources"] != sources[k * n : (k + 1) * n]).any(axis=1) & readable
        changed += [index.describe(k * n + int(i)) for i in np.flatnonzero(differ)]
    if not changed:
        return []
    return [f"{data / 'packed'} ({split}): {len(changed)} of its images changed at their source since they were packed "
            f"({some_of(changed)}), and training would read the old ones; {_same_prepare(data, manifest)}: it "
            "re-packs the shards holding them alone"]


def _damaged_shards(data: Path, recorded: list[str] | None, split: str, workers: int, manifest: dict) -> list[str]:
    """Each shard of the split whose SHA-256 is not the one recorded when it was written."""
    if recorded is None:
        return []
    paths = [shard_path(data / "packed", split, k, ".bin") for k in range(len(recorded))]
    with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib reads without the GIL
        digests = list(pool.map(file_sha256, paths))
    return [f"{path}: its SHA-256 is not the one recorded when it was written (damaged since, without a change of "
            f"size); delete it and {_same_prepare(data, manifest)}: it re-packs that shard alone"
            for path, digest, wanted in zip(paths, digests, recorded) if digest != wanted]


def _same_prepare(data: Path, manifest: dict) -> str:
    """The prepare that made `data` (a packed one), as a command to run again."""
    packed, defaults = manifest["packed"], PackSettings()
    options = [f"--{name.replace('_', '-')} {packed[name]}" for name in ("short_side", "quality", "shard_images")
               if packed[name] != getattr(defaults, name)]
    options += [f"--limit-per-class {manifest['limit_per_class']}"] if manifest.get("limit_per_class") else []
    options += ["--val-only"] if "train" not in manifest["splits"] else []
    return (f"run the same prepare again: imagenet-resnet prepare {manifest['source']['path']} --out {data} --pack"
            + "".join(f" {option}" for option in options))


IMAGENET_SCALE = 200_000  # train images from which a dataset wants ResNet-50 on GPUs


def next_step(out: str, manifest: dict) -> str:
    """The command to run after preparing a folder here, fitted to the data and this machine: evaluation for a
    val-only copy, a ResNet-50 budget on GPUs for ImageNet-sized data, minutes on a CPU for a small dataset.
    (A folder prepared for a URL: upload.next_step.)"""
    train = manifest["splits"].get("train", {}).get("images", 0)
    if not train:
        return f"next: imagenet-resnet evaluate --checkpoint RUN/best.pt --data {out}  (a val-only copy, to evaluate)"
    import torch  # only to see whether there is a GPU

    gpu = torch.cuda.is_available()
    if train >= IMAGENET_SCALE:
        recipe, why = "resnet50_ffcv16", "ResNet-50 in 16 epochs, FFCV's budget" + ("" if gpu else
                      "; this machine has no GPU: run it on one (see `imagenet-resnet recipes`)")
    elif gpu:
        recipe, why = "imagenette_128_20ep", f"{train:,} images: ResNet-50 at 128 px for 20 epochs, minutes on a GPU"
    else:
        recipe, why = "small_cpu", f"{train:,} images on a CPU: a narrow ResNet-18 at 64 px, minutes"
    return f"next: imagenet-resnet train --data {out} --recipe {recipe} --out runs/{recipe}  ({why})"
