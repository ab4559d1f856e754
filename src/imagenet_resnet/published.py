"""Published ResNet-50 figures on ImageNet-1k, to set ours beside: top-1 and top-5 on the validation set (val),
on its ReaL labels (real) and on ImageNet-V2 matched-frequency (v2), each row with its source. Nothing here is
measured by us. Shown only beside figures measured on ImageNet-1k's 1,000 classes: on other data the
comparison would mean nothing.

No torch import: `report` reads this too.
"""

from __future__ import annotations

BENCHMARKS = {"val": "ImageNet-1k val", "real": "ReaL labels", "v2": "ImageNet-V2"}
TIMM_CSVS = ("timm's results CSVs: results-imagenet.csv and results-imagenet-real.csv at commit 0173a139, "
             "results-imagenetv2-matched-frequency.csv at 36d930ff, "
             "https://github.com/huggingface/pytorch-image-models/tree/main/results")
FFCV_TABLE = ("FFCV's table (flip test-time augmentation, 224 px): "
              "https://github.com/libffcv/ffcv-imagenet/blob/e97289fd/README.md#configurations")

# top-1 / top-5 in %; None where the source publishes none. timm's CSVs measure every model with timm's
# validate.py (val, ReaL and V2 alike), so their three columns compare with each other.
PUBLISHED = (
    {"name": "torchvision V1 weights (90 epochs, step LR)", "val": (76.13, 92.858), "real": (82.96, 95.472),
     "v2": (63.33, 84.67), "row": "resnet50.tv_in1k, 224 px, crop 0.875", "source": TIMM_CSVS},
    {"name": "FFCV, 16 epochs (8 x A100, 15 min)", "val": (73.8, 90.8), "real": None, "v2": None,
     "row": "rn50_16_epochs", "source": FFCV_TABLE},
    {"name": "FFCV, 88 epochs (8 x A100, 77 min)", "val": (78.4, 94.1), "real": None, "v2": None,
     "row": "rn50_88_epochs", "source": FFCV_TABLE},
    {"name": "timm a1 recipe (600 epochs), 224 px", "val": (80.38, 94.6), "real": None, "v2": None,
     "row": "224 px", "source": "timm's model card: https://huggingface.co/timm/resnet50.a1_in1k"},
    {"name": "timm a1 recipe (600 epochs), 288 px", "val": (81.214, 95.102), "real": (86.541, 96.842),
     "v2": (69.78, 88.35), "row": "resnet50.a1_in1k, 288 px, crop 1.0", "source": TIMM_CSVS},
)


def side_by_side(ours: dict[str, dict]) -> list[dict]:
    """The published rows for the benchmarks in `ours` ({"val": {"top1": 0.76, "top5": 0.93}, "real": {...}}),
    as fractions like ours; a row with none of those benchmarks is left out."""
    rows = []
    for row in PUBLISHED:
        figures = {b: {"top1": row[b][0] / 100, "top5": None if row[b][1] is None else row[b][1] / 100}
                   for b in ours if row.get(b)}
        if figures:
            rows.append({"name": row["name"], **figures, "row": row["row"], "source": row["source"]})
    return rows


def table_lines(ours: dict[str, dict], who: str = "ours (measured now)") -> list[str]:
    """A plain-text table of top-1 (top-5) per benchmark: our row, then the published ones with their sources."""
    benchmarks = [b for b in BENCHMARKS if b in ours]

    def cell(figures: dict | None) -> str:
        if not figures:
            return "-".rjust(17)
        top5 = f" ({figures['top5']:.2%})" if figures.get("top5") is not None else ""
        return f"{figures['top1']:.2%}{top5}".rjust(17)

    width = max(len(r["name"]) for r in PUBLISHED)
    lines = ["top-1 (top-5)".ljust(width) + "".join(BENCHMARKS[b].rjust(17) for b in benchmarks),
             who.ljust(width) + "".join(cell(ours[b]) for b in benchmarks)]
    rows = side_by_side(ours)
    lines += [r["name"].ljust(width) + "".join(cell(r.get(b)) for b in benchmarks) for r in rows]
    lines.append("published figures, not measured by us; sources (the row of each):")
    for source in dict.fromkeys(r["source"] for r in rows):
        lines.append(f"  {source}")
        lines.append("    rows: " + "; ".join(r["row"] for r in rows if r["source"] == source))
    return lines
