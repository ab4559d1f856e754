"""`imagenet-resnet report RUN`: plots and an epoch-by-epoch Markdown log from a run folder's metrics.

Reads metrics.jsonl and steps.jsonl (and the figures `evaluate` kept in RUN/evaluations/), so it works on a run that is still going (it shows what has been
written) and on a resumed one (a resume drops the records past its checkpoint before writing new ones). RUN may
be the URL a run is mirrored to (`train --mirror s3://bucket/run`): those two files are read from the bucket,
and the plots written to a local folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .published import table_lines
from .run_files import RunFiles


def training_log_markdown(epochs: list[dict]) -> str:
    def pct(x):
        return f"{x:.2%}" if x is not None else ""

    gpu = any("gpu_util" in r for r in epochs)
    rows = ["| epoch | train loss | val loss | top-1 | top-5 | LR at end | images/s | epoch time | waiting for data |"
            + (" GPU use | GPU memory |" if gpu else ""),
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if gpu else "")]
    for r in epochs:
        val_loss = f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else ""
        rows.append(f"| {r['epoch']} | {r['train_loss']:.4f} | {val_loss} | {pct(r.get('val_top1'))} | "
                    f"{pct(r.get('val_top5'))} | {r['lr']:.4g} | {r['images_per_sec']:,.0f} | "
                    f"{r['epoch_seconds']:.1f} s | {pct(r.get('data_wait_share'))} |"
                    + (f" {r.get('gpu_util', 0):.0f}% | {r.get('gpu_memory_gb_peak', 0):.1f} GiB |" if gpu else ""))
    best = max((r for r in epochs if r.get("val_top1") is not None), key=lambda r: r["val_top1"], default=None)
    summary = f"\nBest validation top-1: {best['val_top1']:.2%} at epoch {best['epoch']}.\n" if best else "\n"
    return "# Training log\n\n" + "\n".join(rows) + "\n" + summary


@dataclass
class _Series:
    """A run's records, with their positions on the epoch axis (sampled steps fall between epochs)."""

    epochs: list[dict]
    steps: list[dict]

    def __post_init__(self):
        e, s = self.epochs, self.steps
        steps_per_epoch = e[0]["step"] / e[0]["epoch"] if e else max(r["step"] for r in s) / max(r["epoch"] for r in s)
        self.x_epoch = [r["epoch"] for r in e]
        self.x_step = [r["step"] / steps_per_epoch for r in s]


def _losses(ax, s: _Series) -> None:
    if s.steps:
        ax.plot(s.x_step, [r["loss"] for r in s.steps], color="#bbbbbb", linewidth=0.8,
                label="train (running, sampled steps)")
    ax.plot(s.x_epoch, [r["train_loss"] for r in s.epochs], "o-", label="train (epoch)")
    val = [(r["epoch"], r["val_loss"]) for r in s.epochs if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "s-", label="validation")


def _accuracy(ax, s: _Series) -> None:
    if any("train_top1" in r for r in s.steps):
        ax.plot(s.x_step, [100 * r.get("train_top1", 0) for r in s.steps], color="#bbbbbb", linewidth=0.8,
                label="train top-1 (running, sampled steps)")
    for key, label, style in (("val_top1", "val top-1", "o-"), ("val_top5", "val top-5", "s-"),
                              ("val_top1_ema", "val top-1, EMA weights", "^--")):
        points = [(r["epoch"], 100 * r[key]) for r in s.epochs if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)


def _learning_rate(ax, s: _Series) -> None:
    if s.steps:
        ax.plot(s.x_step, [r["lr"] for r in s.steps], label="sampled steps")
    ax.plot(s.x_epoch, [r["lr"] for r in s.epochs], "o", label="end of epoch")


def _speed(ax, s: _Series) -> None:
    ax.plot(s.x_epoch, [r["images_per_sec"] for r in s.epochs], "o-", color="#1f77b4", label="images/s")
    ax.set_ylim(bottom=0)  # a 4% wobble should look like one
    if any("data_wait_share" in r for r in s.epochs):
        twin = ax.twinx()
        twin.plot(s.x_epoch, [100 * r.get("data_wait_share", 0) for r in s.epochs], "s--", color="#d62728",
                  label="waiting for data (right axis)")
        twin.set_ylabel("% of the epoch waiting for data", color="#d62728")
        twin.set_ylim(0, 100)


USE_SERIES = (("gpu_util", "GPU utilisation", "#2ca02c"),
              ("cpu_util_run", "CPU, this run (its process and loader workers)", "#1f77b4"),
              ("cpu_util", "CPU, whole machine (every program)", "#ff7f0e"))  # CPU: % of all the machine's cores


def _system(ax, s: _Series) -> None:
    for key, label, color in USE_SERIES:
        sampled = [(x, r[key]) for x, r in zip(s.x_step, s.steps) if key in r]
        if sampled:
            ax.plot(*zip(*sampled), color=color, linewidth=0.8, alpha=0.5)
        points = [(r["epoch"], r[key]) for r in s.epochs if key in r]
        if points:
            ax.plot(*zip(*points), "o-", color=color, label=f"{label} (epoch mean)")
    ax.set_ylim(0, 105)
    memory = [(r["epoch"], r["gpu_memory_gb_peak"]) for r in s.epochs if "gpu_memory_gb_peak" in r]
    if memory:
        twin = ax.twinx()
        twin.plot(*zip(*memory), "s--", color="#9467bd", label="peak GPU memory (right axis)")
        twin.set_ylabel("peak GPU memory in use (GiB)", color="#9467bd")
        twin.set_ylim(0, max(m for _, m in memory) * 1.15)


def _plots(s: _Series) -> list[tuple]:
    """(file, title, y label, drawing) of each plot this run's records can fill."""
    plots = [("loss.png", "Loss", "cross-entropy", _losses)]
    if any(r.get("val_top1") is not None for r in s.epochs) or any("train_top1" in r for r in s.steps):
        plots.append(("accuracy.png", "Accuracy", "%", _accuracy))
    plots.append(("lr.png", "Learning rate", "LR", _learning_rate))
    if s.epochs:
        plots.append(("speed.png", "Throughput and data-loader wait", "images/s", _speed))
    if any("cpu_util" in r or "gpu_util" in r for r in s.epochs + s.steps):
        gpu = any("gpu_util" in r for r in s.epochs + s.steps)
        plots.append(("system.png", "GPU and CPU use" if gpu else "CPU use (no GPU figures on this run)",
                      "% (CPU: of all the machine's cores)", _system))
    return plots


def _legend(fig) -> None:
    """One legend for the plot, naming the series of its right-hand axis too (a twin axis has none of its own)."""
    handles, labels = [], []
    for axis in fig.axes:
        more = axis.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        fig.axes[-1].legend(handles, labels)  # on the axis drawn last, so no line hides it


def draw_plot(series: _Series, title: str, ylabel: str, draw):
    """One plot of the report as a matplotlib Figure: `draw(ax, series)` on an epoch axis ticked in whole epochs."""
    # Imported here, slow as it is: a report that fails on its records (a wrong URL) says so at once.
    from matplotlib.figure import Figure  # no pyplot: a figure of its own, drawn without any GUI backend
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    draw(ax, series)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    _legend(fig)
    fig.tight_layout()
    return fig


def draw_reliability(calibration: dict, title: str):
    """The reliability diagram: accuracy against confidence per bin, the diagonal a calibrated model would
    follow, the gap shaded, and below it the share of images in each bin."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 6.4), dpi=110)
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    bins = calibration["bins"]
    total = sum(b["images"] for b in bins)
    filled = [b for b in bins if b["images"]]
    width = bins[0]["hi"] - bins[0]["lo"]
    lefts = [b["lo"] for b in filled]
    ax.bar(lefts, [100 * b["accuracy"] for b in filled], width=width, align="edge", color="#1f77b4",
           edgecolor="white", label="accuracy of the images in the bin")
    ax.bar(lefts, [100 * (b["confidence"] - b["accuracy"]) for b in filled], bottom=[100 * b["accuracy"] for b in filled],
           width=width, align="edge", color="#d62728", alpha=0.35, hatch="//", edgecolor="#d62728",
           label="gap to the bin's mean confidence")
    ax.plot([0, 1], [0, 100], "--", color="#555555", label="calibrated: accuracy = confidence")
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{title}\nECE {calibration['ece']:.2%}, mean confidence {calibration['mean_confidence']:.2%}, "
                 f"accuracy {calibration['accuracy']:.2%}", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(True, alpha=0.3)
    hist.bar([b["lo"] for b in bins], [100 * b["images"] / total for b in bins], width=width, align="edge",
             color="#7f7f7f", edgecolor="white")
    hist.set_xlim(0, 1)
    hist.set_xlabel("confidence: the softmax probability of the predicted class")
    hist.set_ylabel("% of images")
    hist.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def draw_per_class(rows: list[dict], title: str, worst: int = 25):
    """Accuracy per class: every class's bar with its name when there are few; with many, all classes sorted
    as a curve (with the mean) above the `worst` classes by name."""
    from matplotlib.figure import Figure

    measured = sorted((r for r in rows if r["images"]), key=lambda r: r["correct"] / r["images"])
    accuracy = [100 * r["correct"] / r["images"] for r in measured]
    label = [f"{r['name']} ({r['images']})" for r in measured]
    if len(measured) <= 40:
        fig = Figure(figsize=(7, 1.2 + 0.28 * len(measured)), dpi=110)
        ax = fig.subplots()
        ax.bar_label(ax.barh(label, accuracy, color="#1f77b4"), fmt="%.0f%%", padding=2, fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("top-1 accuracy (%); in brackets: the class's images")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        return fig
    fig = Figure(figsize=(8, 10), dpi=110)
    curve, bars = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 2.2]})
    curve.plot(range(1, len(accuracy) + 1), accuracy, color="#1f77b4")
    mean = sum(accuracy) / len(accuracy)
    curve.axhline(mean, linestyle="--", color="#555555", label=f"mean over classes {mean:.1f}%")
    curve.set_xlabel(f"the {len(accuracy)} classes, worst to best")
    curve.set_ylabel("top-1 (%)")
    curve.set_ylim(0, 100)
    curve.set_title(title, fontsize=10)
    curve.legend(loc="lower right", fontsize=8)
    curve.grid(True, alpha=0.3)
    bars.barh(label[:worst][::-1], accuracy[:worst][::-1], color="#d62728")
    bars.set_xlim(0, 100)
    bars.set_xlabel(f"top-1 accuracy (%) of the {worst} worst classes; in brackets: the class's images")
    bars.tick_params(axis="y", labelsize=7)
    bars.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def draw_evaluation_plots(evaluation: dict, out: Path, prefix: str = "") -> list[str]:
    """The reliability diagram and the per-class chart of an `evaluate` report, as PNGs in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    what = f"{Path(evaluation['data']).name}, {evaluation['weights']} weights, {evaluation['images']:,} images"
    written = []
    for name, fig in ((f"{prefix}reliability.png", draw_reliability(evaluation["calibration"], f"Calibration: {what}")),
                      (f"{prefix}per_class.png", draw_per_class(evaluation["per_class"], f"Accuracy per class: {what}"))):
        fig.savefig(out / name)
        written.append(str(out / name))
    return written


def saved_evaluations(files: RunFiles) -> dict[str, dict]:
    """The reports `evaluate` kept in the run folder (RUN/evaluations/*.json), by file stem; none for a mirror."""
    folder = None if files.remote else files.root / "evaluations"
    if folder is None or not folder.is_dir():
        return {}
    found = {}
    for path in sorted(folder.glob("*.json")):
        try:
            found[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a file cut short is left out of the report, not a reason to fail it
    return found


def evaluations_markdown(evaluations: dict[str, dict]) -> str:
    """The training log's section on the saved evaluations: each one's figures, and the published ones beside."""
    parts = ["\n## Evaluations (`imagenet-resnet evaluate`)\n"]
    for stem, e in evaluations.items():
        real = e.get("real")
        real_text = f"; ReaL top-1 {real['top1']:.2%} on {real['images']:,} images" if real else ""
        parts.append(f"**{stem}**: `{e['data']}`, {e['images']:,} images, {e['weights']} weights, {e['size']} px: "
                     f"top-1 {e['top1']:.2%}, top-5 {e['top5']:.2%}{real_text}; ECE "
                     f"{e['calibration']['ece']:.2%}, NLL {e['calibration']['nll']:.4f}.\n")
        if e.get("published"):
            parts.append("```\n" + "\n".join(table_lines(e["published"]["ours"], "ours (measured)")) + "\n```\n")
    return "\n".join(parts)


def make_report(run: str | Path, out: str | Path | None = None) -> dict:
    files = RunFiles(run)
    epochs, steps = files.records("metrics.jsonl"), files.records("steps.jsonl")
    if not epochs and not steps:
        raise UserError(f"{files}: no metrics.jsonl or steps.jsonl yet; is this a run folder?" if not files.remote
                        else f"{files}: no metrics.jsonl or steps.jsonl there; give the URL the run was mirrored "
                        "to (train --mirror URL), or wait for its first records")
    # A mirror's plots go to this machine (./report-NAME), beside its training_log.md: the bucket is the run's.
    # An --out given takes the log too: it is how a run folder one cannot write to gets its report.
    log_in_out = files.remote or out is not None
    out = Path(out) if out else (Path(f"report-{files.name}") if files.remote else files.root / "report")
    log_path = out / "training_log.md" if log_in_out else files.root / "training_log.md"
    out.mkdir(parents=True, exist_ok=True)
    series, written = _Series(epochs, steps), []
    for name, title, ylabel, draw in _plots(series):
        fig = draw_plot(series, title, ylabel, draw)
        fig.savefig(out / name)
        written.append(str(out / name))
    evaluations = saved_evaluations(files)
    for stem, evaluation in evaluations.items():
        if "per_class" in evaluation and "calibration" in evaluation:
            written += draw_evaluation_plots(evaluation, out, f"{stem}-")
    log = training_log_markdown(epochs) + (evaluations_markdown(evaluations) if evaluations else "")
    log_path.write_text(log)
    written.append(str(log_path))
    return {"run": str(files), "epochs": len(epochs), "sampled_steps": len(steps), "evaluations": len(evaluations),
            "files": written}
