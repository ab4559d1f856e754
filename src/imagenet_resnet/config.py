"""Run configuration: plain dataclasses, loaded from a YAML recipe, overridden from the command line.

The resolved config is saved as YAML in the run folder and as a plain dict inside every checkpoint;
changed_settings lists what a config changes from a saved one (a resume's log line).
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .errors import UserError

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # models.ARCHITECTURES
PIPELINES = ("fast", "full-decode", "reference")  # data.pipeline: see data/presets.py
VARIANTS = ("b", "c", "d")  # model.variant: see models.py
SCHEDULES = ("step", "cosine", "flat-cosine", "onecycle", "linear", "constant")
OPTIMIZERS = ("sgd", "adamw", "radam", "lamb")
LR_SCALINGS = ("auto", "linear", "sqrt")
SPOT_PROVIDERS = ("", "aws", "gcp")  # train.spot_notice: see training/spot.py
_AMOUNT = r"(\d+(?:\.\d*)?|\.\d+)"
_BUDGET_TIME = re.compile(rf"(?:{_AMOUNT}\s*h)?\s*(?:{_AMOUNT}\s*m)?\s*(?:{_AMOUNT}\s*s)?")  # 6h, 2h30m, 90m, 1.5h
_BUDGET_MONEY = re.compile(rf"{_AMOUNT}\s*usd")


@dataclass
class ModelConfig:
    name: str = "resnet50"
    width: int = 64  # channels of the first stage; 64 is the paper's ResNet
    zero_init_residual: bool = True  # last BN of each block starts at zero
    channels_last: bool = True  # NHWC memory layout on the GPU (faster convs with tensor cores)
    blurpool: bool = False  # low-pass before every strided conv (FFCV's ResNet-50 recipes); same weights' names
    variant: str = "b"  # b: torchvision's (v1.5); c: + deep 3x3 stem; d: + average-pool shortcuts (timm's resnet50d)

    def describe(self) -> str:
        """The architecture in a few words: resnet50, resnet50-D, resnet18 (width 16)."""
        return (self.name if self.variant == "b" else f"{self.name}-{self.variant.upper()}") + (
            "" if self.width == 64 else f" (width {self.width})")


@dataclass
class DataConfig:
    path: str = ""  # a folder made by `imagenet-resnet prepare`, or any folder holding train/ and val/
    packed: bool = True  # read the packed copy when the prepared folder has one
    pipeline: str = "fast"  # fast | full-decode | reference (torchvision's transforms, for A/B checks; slower)
    train_size: int = 224  # side of the random-resized crop (the final one with progressive resizing)
    progressive_start_size: int = 0  # 0 = off; else train at this side up to progressive_start_epoch, then
    progressive_start_epoch: int = 0  # ramp linearly to train_size by progressive_end_epoch, in steps of 32
    progressive_end_epoch: int = 0  # (FFCV's min_res, start_ramp, end_ramp; epochs counted from 0)
    eval_size: int = 224  # side of the centre crop
    eval_crop_ratio: float = 0.875  # crop / resized short side (224/256)
    eval_flip: bool = False  # test-time augmentation: average the logits of each image and its mirror image
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # area fraction of the crop
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # aspect ratio of the crop
    hflip: bool = True
    mixup_alpha: float = 0.0  # Mixup, lambda ~ Beta(a, a); 0 = off (0.2 is common)
    cutmix_alpha: float = 0.0  # CutMix; 0 = off (1.0 is common); with both on, one of the two per batch
    color_jitter: float = 0.0  # brightness/contrast/saturation factors drawn from [1-j, 1+j]; 0 = off
    workers: int = -1  # loader processes per training process; -1 = the node's cores / its training processes
    # (at most 16), and half that for validation
    prefetch_batches: int = 4  # batches each worker prepares ahead


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw | radam | lamb
    lr: float = 0.1  # per 256 images: the LR used is lr scaled by global_batch / 256 (see lr_scaling)
    lr_scaling: str = "auto"  # linear | sqrt | auto: linear for sgd (Goyal et al. 2017), sqrt for adamw, radam
    # and lamb (as timm's train.py; Malladi et al. 2022 for Adam's square-root rule)
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw, radam, lamb
    eps: float = 1e-8  # adamw, radam (lamb uses 1e-6); fastai's Imagenette runs use 1e-6
    weight_decay: float = 1e-4  # decoupled (AdamW-style) for adamw, radam and lamb
    clip_grad_norm: float = 0.0  # clip the global gradient norm to this; 0 = off
    decay_bn_and_bias: bool = False  # weight decay on BN parameters and biases too (usually hurts)
    label_smoothing: float = 0.0
    find_lr: bool = False  # run the LR range test first and train with its suggestion instead of `lr`
    fused: bool = False  # one fused CUDA kernel for the whole SGD or AdamW update (CUDA only; always on in fp16)


@dataclass
class ScheduleConfig:
    name: str = "step"  # step | cosine | flat-cosine | onecycle | linear | constant
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start_factor * lr (step, cosine, flat-cosine, constant)
    warmup_start_factor: float = 0.1
    milestones: list[float] = field(default_factory=lambda: [30.0, 60.0, 80.0])  # epochs (step)
    gamma: float = 0.1  # LR factor at each milestone (step)
    min_lr_factor: float = 0.0  # floor of the cosine, as a fraction of lr
    pct_start: float = 0.25  # fraction of the run spent rising (onecycle), or at the peak (flat-cosine)
    div_factor: float = 25.0  # onecycle starts at lr / div_factor
    final_div_factor: float = 1e4  # onecycle ends at lr / div_factor / final_div_factor
    peak_epoch: float = 2.0  # linear: ramps from start_factor to lr at this epoch, then down
    start_factor: float = 0.0  # linear: LR factor at step 0
    end_factor: float = 0.0  # linear: LR factor at the last step


@dataclass
class TrainConfig:
    epochs: int = 90
    batch_size: int = 256  # images per process (per GPU) per forward pass: a micro-batch, not the global batch
    accumulation_steps: int = 1  # micro-batches per optimizer step: global batch = batch_size * this * world size
    precision: str = "auto"  # auto (bf16 on GPUs with native bf16 - A100, H100, RTX 30xx on -, fp16 with loss
    # scaling on older ones - T4, V100 -, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    sync_bn: bool = False  # under torchrun, BatchNorm statistics over the global batch (slower; for small per-GPU batches)
    deterministic: bool = False  # bitwise-reproducible kernels (slower on GPU)
    eval_every: int = 1  # epochs between validations; the last epoch is always evaluated (0: only the last)
    checkpoint_every_steps: int = 0  # also write last.pt every N optimizer steps; 0 = epoch ends only
    log_every_steps: int = 50
    record_samples: bool = False  # append the image indices of every optimizer step to RUN/samples.jsonl: which
    # images a step trained on (a loss spike's batch), the same on any split into processes
    sample_system_seconds: float = 2.0  # CPU (and GPU, through NVML) use sampled this often in the background; 0 = off
    tensorboard: bool = True  # event files in RUN/tensorboard when the tensorboard package is installed
    stop_at_step: int = 0  # checkpoint and stop after this many optimizer steps (a time-boxed session); 0 = off
    ema_decay: float = 0.0  # keep an exponential moving average of the weights (e.g. 0.9999), evaluated too, and
    # picking best.pt; 0 = off. evaluate/predict/serve/export --ema use it
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) at update n, so early averages forget the init
    compile: str = ""  # torch.compile mode: "" = off, default, reduce-overhead, max-autotune, ...
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no C++ compiler needed)
    init_from: str = ""  # start from these weights (torchvision/timm format or our checkpoint); a different head is replaced
    budget: str = ""  # fit the whole run to this much wall time (6h, 2h30m, 90m, 600s) or money (25usd, with
    # price_per_hour): the recipe's epochs stretched or shrunk to fit (training/budget.py); "" = off
    price_per_hour: float = 0.0  # what the run's machines cost together per hour: for a budget in usd, and to
    # say a time budget's cost
    total_steps: int = 0  # the run's length in optimizer steps, the recipe stretched to it; 0 = epochs x steps per
    # epoch. With schedule_knots, replays a budgeted run without its budget (its train.log prints both)
    schedule_knots: list = field(default_factory=list)  # [[step, recipe step, rate], ...]: where a budgeted
    # run's re-fits re-stretched the rest of its schedule (training/budget.py Timeline)
    spot_notice: str = ""  # aws | gcp: watch the instance metadata service for a spot/preemption notice, and on
    # one checkpoint and exit 0 (training/spot.py); "" = off
    spot_metadata_url: str = ""  # the metadata service's address; "" = the provider's (http://169.254.169.254 on
    # AWS, http://metadata.google.internal on GCP)
    spot_poll_seconds: float = 5.0  # how often the metadata service is asked (AWS warns 2 minutes ahead, GCP 30 s)

    def budget_in_money(self) -> bool:
        return self.budget.strip().lower().endswith("usd")

    def budget_seconds(self) -> float:
        """train.budget in seconds of wall time (0: no budget)."""
        if not self.budget:
            return 0.0
        text = self.budget.strip().lower()
        money, time = _BUDGET_MONEY.fullmatch(text), _BUDGET_TIME.fullmatch(text)
        if money and self.price_per_hour <= 0:
            raise ConfigError(f"--budget {self.budget}: a budget in money needs what the machines cost, e.g. "
                              "--price-per-hour 4.10 (dollars per hour, all the run's machines together)")
        if money:
            seconds = float(money[1]) / self.price_per_hour * 3600
        elif time:
            hours, minutes, secs = (float(part or 0) for part in time.groups())
            seconds = hours * 3600 + minutes * 60 + secs
        else:
            seconds = 0.0
        if seconds <= 0:
            raise ConfigError(f"train.budget={self.budget!r}: give wall time as 6h, 2h30m, 90m or 600s, or money "
                              "as 25usd with --price-per-hour")
        return seconds


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "Config":
        cfg = cls()
        apply_dict(cfg, raw, source)
        return cfg


class ConfigError(UserError):
    """A recipe or --set override that is not a valid config."""


LARGEST_INT = 2**63 - 1  # what numpy and torch hold: a larger whole number would overflow there, far from here
KNOTS = "schedule_knots"  # the one list of lists: [[step, recipe step, rate], ...]


def _short(value: Any) -> str:
    """A value for a message, bounded however large or deeply nested (reprlib: a few items per level)."""
    return reprlib.repr(value)


def _finite(value: Any, where: str) -> Any:
    """`value`, unless it is a number that is not finite or too large a whole number: a ConfigError."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if isinstance(value, int) and abs(value) > LARGEST_INT:
        raise ConfigError(f"{where}: {value} is too large a whole number (the most is {LARGEST_INT})")
    return value


def _flat_list(value: Any, key: str, where: str) -> list:
    """A list setting's value: numbers (or text, which YAML 1.1 makes of 1e-5), and for train.schedule_knots lists of
    three of them; nothing nested deeper. A YAML alias repeated within itself (a "billion laughs") is a few lines
    that dataclasses.asdict, as every saved config and checkpoint is made, would copy out exponentially."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list like [1, 2], got {_short(value)}")
    rows = value if key == KNOTS else [value]
    if key == KNOTS and not all(isinstance(knot, (list, tuple)) and len(knot) == 3 for knot in rows):
        raise ConfigError(f"{where}: expected [[step, recipe step, rate], ...], got {_short(value)}")
    if not all(isinstance(v, (int, float, str)) for row in rows for v in row):
        raise ConfigError(f"{where}: expected a list of numbers like [1, 2], got {_short(value)}")
    return [[_finite(v, where) for v in knot] for knot in value] if key == KNOTS else [_finite(v, where) for v in value]


def _coerce(value: Any, current: Any, where: str, key: str = "") -> Any:
    """Check a value against the type of the default it replaces (YAML gives ints where floats are meant)."""
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_short(value)}")
        return value
    if isinstance(current, float) and not isinstance(value, bool):
        if isinstance(value, int):
            return float(_finite(value, where))
        if isinstance(value, str):  # YAML 1.1 reads 5e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                return _finite(number, where)
    if isinstance(current, list):
        value = _flat_list(value, key, where)
        return [float(v) if isinstance(v, int) and current and isinstance(current[0], float) else v for v in value]
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"{where}: expected {type(current).__name__}, got {_short(value)}")
    return _finite(value, where)


def apply_dict(cfg: Config, raw: dict[str, Any], source: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, data, optim, schedule, train)")
    for section_name, values in raw.items():
        section = getattr(cfg, section_name, None) if isinstance(section_name, str) else None
        if section is None or not dataclasses.is_dataclass(section):
            raise ConfigError(f"{source}: unknown section {section_name!r}; sections are {', '.join(_sections())}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section_name!r} must be a mapping of key: value")
        known = {f.name for f in dataclasses.fields(section)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown key {section_name}.{key}; known keys: {', '.join(sorted(known))}"
                )
            where = f"{source}: {section_name}.{key}"
            setattr(section, key, _coerce(value, getattr(section, key), where, key))


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def parse_override(text: str) -> dict[str, Any]:
    """`section.key=value` -> {section: {key: value}}, the value read as YAML (numbers, lists, booleans)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set optim.lr=0.2")
    dotted, value = text.split("=", 1)
    section, key = dotted.split(".", 1)
    return {section.strip(): {key.strip(): _yaml(value, f"--set {text}")}}


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # shipped with the package


def recipe_names() -> list[str]:
    """The recipes that ship with the package, by name (`--recipe NAME`)."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def find_recipe(recipe: str | Path) -> Path:
    """A recipe file: the path given, else the shipped recipe of that name (`resnet50_step90`, with or without
    `.yaml`, or `recipes/resnet50_step90.yaml` from outside the repository)."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"recipe {recipe} not found: give a YAML file or one of the shipped recipes "
                      f"({', '.join(recipe_names())}); `imagenet-resnet recipes` describes them")


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if recipe is not None:
        path = find_recipe(recipe)
        with open(path, "rb") as f:
            raw = _yaml(f, f"recipe {path}") or {}
        apply_dict(cfg, raw, str(path))
    for text in overrides or []:
        apply_dict(cfg, parse_override(text), f"--set {text}")
    validate(cfg)
    _refuse_credentials(cfg)
    return cfg


def _yaml(text, what: str) -> Any:
    """yaml.safe_load (plain data only, never an object); whatever it refuses, one line naming `what`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} is not valid YAML: {e}".replace("\n", " ")) from None
    except RecursionError:  # PyYAML composes nested lists by recursion
        raise ConfigError(f"{what}: nested too deeply to be a setting") from None


def _refuse_credentials(cfg: Config) -> None:
    """No setting may hold a URL with user:password@ in it: the config is saved in config.yaml, in every checkpoint
    and as the trackers' parameters, and goes wherever the run folder is mirrored."""
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            if isinstance(value, str) and "://" in value:
                scheme, netloc = urlsplit(value)[:2]
                if "@" in netloc:
                    raise ConfigError(f"{section}.{key}: the URL {scheme}://...@{netloc.rsplit('@', 1)[-1]} holds "
                                      "credentials (user:password@), which would be saved with the run; remove them "
                                      "(a store's credentials come from the environment: docs/cloud.md)")


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take: low <= value (low < value when low_open), and the same for high."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, name: str) -> str:
        """The range in words about `name`: "lr > 0", "0 <= momentum < 1"."""
        if self.high is None:
            return f"{name} {'>' if self.low_open else '>='} {self.low:g}"
        low = "" if self.low is None else f"{self.low:g} {'<' if self.low_open else '<='} "
        return f"{low}{name} {'<' if self.high_open else '<='} {self.high:g}"


AT_LEAST_1, AT_LEAST_0, ABOVE_0 = Range(1), Range(0), Range(0, low_open=True)
FRACTION, FRACTION_BELOW_1 = Range(0, 1), Range(0, 1, high_open=True)
# Tops for the settings that size memory: far beyond any real run (ResNet-50 at width 512 has 1.6 billion
# parameters; a 4096 px crop is 50 MB decoded), so that a recipe or a checkpoint from elsewhere saying 10**12 is
# one line here, not an attempt to allocate it.
WIDTHS, SIDES, BATCHES = Range(1, 512), Range(1, 4096), Range(1, 65536)
# Every numeric setting with an obvious valid range, checked when a config is loaded: a bad size fails here in
# one line, not later in a loader worker. (train.eval_every, ema_decay, total_steps and spot_poll_seconds have
# checks of their own below, with advice, and data.crop_scale its order too.)
RANGES = {
    "model.width": WIDTHS,
    "data.train_size": SIDES, "data.eval_size": SIDES, "data.progressive_start_size": Range(0, 4096),
    "data.crop_scale": Range(0, 1, low_open=True),
    "data.progressive_start_epoch": AT_LEAST_0, "data.progressive_end_epoch": AT_LEAST_0,
    "data.eval_crop_ratio": Range(0, 1, low_open=True), "data.crop_ratio": ABOVE_0,
    "data.mixup_alpha": AT_LEAST_0, "data.cutmix_alpha": AT_LEAST_0, "data.color_jitter": AT_LEAST_0,
    "data.workers": Range(-1, 1024), "data.prefetch_batches": Range(1, 1024),
    "optim.lr": ABOVE_0, "optim.momentum": FRACTION_BELOW_1, "optim.betas": FRACTION_BELOW_1, "optim.eps": ABOVE_0,
    "optim.weight_decay": AT_LEAST_0, "optim.clip_grad_norm": AT_LEAST_0, "optim.label_smoothing": FRACTION_BELOW_1,
    "schedule.warmup_epochs": AT_LEAST_0, "schedule.warmup_start_factor": AT_LEAST_0,
    "schedule.milestones": AT_LEAST_0, "schedule.gamma": ABOVE_0, "schedule.min_lr_factor": FRACTION,
    "schedule.pct_start": FRACTION, "schedule.div_factor": ABOVE_0, "schedule.final_div_factor": ABOVE_0,
    "schedule.peak_epoch": AT_LEAST_0, "schedule.start_factor": AT_LEAST_0, "schedule.end_factor": AT_LEAST_0,
    "train.epochs": Range(1, 100_000), "train.batch_size": BATCHES, "train.accumulation_steps": BATCHES,
    "train.seed": AT_LEAST_0, "train.checkpoint_every_steps": AT_LEAST_0, "train.log_every_steps": AT_LEAST_0,
    "train.sample_system_seconds": AT_LEAST_0, "train.stop_at_step": AT_LEAST_0, "train.price_per_hour": AT_LEAST_0,
}
PAIRS = ("data.crop_ratio", "optim.betas", "data.crop_scale")  # lists of exactly two numbers


def out_of_range(cfg: Config) -> list[str]:
    """A phrase for each setting outside its range in RANGES (each element of a list setting), naming it."""
    problems = []
    for name, allowed in RANGES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        values = value if isinstance(value, list) else [value]
        if name in PAIRS and len(values) != 2:
            problems.append(f"{name}={value}: give two numbers, e.g. {getattr(getattr(Config(), section), key)}")
        elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            problems.append(f"{name}={value}: give numbers")
        elif any(v not in allowed for v in values):
            about = "each value" if isinstance(value, list) else key
            problems.append(f"{name}={value} is out of range: need {allowed.describe(about)}")
    return problems


def validate(cfg: Config) -> None:
    t, s = cfg.train, cfg.schedule
    problems = out_of_range(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.data.progressive_start_size and cfg.data.progressive_end_epoch < cfg.data.progressive_start_epoch:
        raise ConfigError(f"data.progressive_end_epoch={cfg.data.progressive_end_epoch} comes before "
                          f"data.progressive_start_epoch={cfg.data.progressive_start_epoch}: the ramp needs "
                          "start <= end")
    if t.eval_every < 0:
        raise ConfigError(f"train.eval_every={t.eval_every}: give epochs between validations, or 0 for the last "
                          "epoch only")
    if cfg.optim.lr_scaling not in LR_SCALINGS:
        raise ConfigError(f"optim.lr_scaling={cfg.optim.lr_scaling!r}: choose {', '.join(LR_SCALINGS)}")
    if cfg.model.name not in MODEL_NAMES:
        raise ConfigError(f"model.name={cfg.model.name!r}: choose {', '.join(MODEL_NAMES)}")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision={t.precision!r}: choose auto, fp32, bf16 or fp16")
    if s.name not in SCHEDULES:
        raise ConfigError(f"schedule.name={s.name!r}: choose {', '.join(SCHEDULES)}")
    if cfg.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.optim.name!r}: choose {', '.join(OPTIMIZERS)}")
    if cfg.data.pipeline not in PIPELINES:
        raise ConfigError(f"data.pipeline={cfg.data.pipeline!r}: choose {', '.join(PIPELINES)}")
    if cfg.model.variant not in VARIANTS:
        raise ConfigError(f"model.variant={cfg.model.variant!r}: choose {', '.join(VARIANTS)}")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={t.ema_decay}: need 0 <= decay < 1 (0 turns it off)")
    if t.budget_seconds() and (t.total_steps or t.schedule_knots):
        raise ConfigError("train.budget fits the run's length itself: drop train.total_steps and "
                          "train.schedule_knots (they replay a budgeted run without a budget)")
    if t.spot_notice not in SPOT_PROVIDERS:
        raise ConfigError(f"train.spot_notice={t.spot_notice!r}: choose aws or gcp (the cloud whose spot or "
                          "preemptible instance the run is on), or \"\" for off")
    if t.spot_poll_seconds <= 0:
        raise ConfigError(f"train.spot_poll_seconds={t.spot_poll_seconds}: give seconds between looks at the "
                          "metadata service, e.g. 5")
    if t.spot_metadata_url and not re.match(r"https?://", t.spot_metadata_url):
        raise ConfigError(f"train.spot_metadata_url={t.spot_metadata_url!r}: give an http:// address, e.g. "
                          "http://169.254.169.254, or \"\" for the provider's")
    if t.total_steps < 0 or (t.schedule_knots and not t.total_steps):
        raise ConfigError("train.total_steps must be >= 1 when set, and is needed with train.schedule_knots")
    lo, hi = cfg.data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale={cfg.data.crop_scale}: need 0 < min <= max <= 1")


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each setting of `current` that differs from `saved` (both configs as dicts, as to_dict gives them), as
    "section.key: saved -> current"; a setting `saved` lacks (newer than it) shows as None there."""
    return [f"{section}.{key}: {saved.get(section, {}).get(key)} -> {value}"
            for section, values in current.items() for key, value in values.items()
            if saved.get(section, {}).get(key) != value]


def save_config(cfg: Config, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
