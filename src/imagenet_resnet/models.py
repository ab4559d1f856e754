"""ResNet-18/34/50/101/152 (v1.5: the stride sits on the 3x3 conv), written from scratch.

Module and parameter names follow torchvision exactly, so a torchvision or timm ResNet state dict loads
without renaming, and ours load there.

`variant` names the tweaks of He et al. 2019, "Bag of Tricks for Image Classification" (section 4.1):
- "b": torchvision's ResNet (v1.5 is ResNet-B: the stride on the 3x3 conv of each bottleneck);
- "c": the 7x7 stem conv replaced by three 3x3 convs (width/2, width/2, width channels);
- "d": "c" plus shortcuts that downsample with a 2x2 average pool before a stride-1 1x1 conv, so that
  they no longer skip three quarters of their input. The paper's Table 5: ResNet-50-B 76.66%, -C 76.87%,
  -D 77.16% ImageNet top-1, at 4.1, 4.3 and 4.3 GFLOPs. Names follow timm's resnet50d (conv1.0, conv1.1,
  ...; downsample.1 the conv, downsample.2 the BN), so its weights load.

`build_model_from_config` builds the model a recipe trains from its config's model section, on its device and
memory layout: training, `bench train` and every checkpoint loaded (`trained_model`: evaluate, serving,
export) build it there, so a benchmark times the very model a recipe trains.
"""

from __future__ import annotations

import pickle

import torch
from torch import nn

from .config import ModelConfig
from .errors import UserError
from .runtime import memory_format
from .storage.verified import compressed_records


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)  # v1.5: stride here, not on conv1
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        width: int = 64,
        zero_init_residual: bool = False,
        variant: str = "b",
    ):
        super().__init__()
        self.in_ch, self.avg_down = width, variant == "d"
        if variant == "b":
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        else:  # the deep stem: same output shape and receptive field, three 3x3 convs
            stem = width // 2
            self.conv1 = nn.Sequential(
                _conv3x3(3, stem, stride=2), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
                _conv3x3(stem, stem), nn.BatchNorm2d(stem), nn.ReLU(inplace=True),
                _conv3x3(stem, width),
            )
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block starts as the identity: helps large-batch training (Goyal et al., 2017).
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _make_layer(self, block, width: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if (stride != 1 or self.in_ch != width * block.expansion) and self.avg_down:
            pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
            downsample = nn.Sequential(pool, _conv1x1(self.in_ch, width * block.expansion),
                                       nn.BatchNorm2d(width * block.expansion))
        elif stride != 1 or self.in_ch != width * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.in_ch, width * block.expansion, stride),
                nn.BatchNorm2d(width * block.expansion),
            )
        layers = [block(self.in_ch, width, stride, downsample)]
        self.in_ch = width * block.expansion
        layers += [block(self.in_ch, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


ARCHITECTURES: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def build_model(name: str, num_classes: int = 1000, width: int = 64, zero_init_residual: bool = False,
                blurpool: bool = False, variant: str = "b") -> ResNet:
    """Build a ResNet by name; `width` (64 in the paper) scales every stage, for small demo models."""
    if name not in ARCHITECTURES:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    if variant not in ("b", "c", "d"):
        raise UserError(f"unknown ResNet variant {variant!r}; choose b (torchvision's), c or d")
    block, layers = ARCHITECTURES[name]
    model = ResNet(block, layers, num_classes=num_classes, width=width, zero_init_residual=zero_init_residual,
                   variant=variant)
    return apply_blurpool(model) if blurpool else model


def build_model_from_config(model_cfg: ModelConfig, num_classes: int,
                            device: torch.device | str = "cpu") -> ResNet:
    """The model of the config's model section (name, width, variant, blurpool, zero_init_residual), on
    `device` in the memory layout model.channels_last asks for."""
    m = model_cfg
    model = build_model(m.name, num_classes, m.width, m.zero_init_residual, m.blurpool, m.variant)
    return model.to(device, memory_format=memory_format(m.channels_last))


def trained_model(model_cfg: ModelConfig, num_classes: int, weights: dict[str, torch.Tensor],
                  device: torch.device | str = "cpu", where: str = "the weights") -> ResNet:
    """A checkpoint's or an export's model, in eval mode: the config's model with `weights` (a state dict,
    DDP or compile prefixes allowed) loaded into it. The config and the weights come from the same file, from
    anyone: the model is first built without memory (on the meta device) and its every tensor's shape compared
    with the weights', so that a config asking for more than the file holds is one line naming `where`, never an
    allocation of it."""
    m = model_cfg
    with torch.device("meta"):
        shapes = build_model(m.name, num_classes, m.width, m.zero_init_residual, m.blurpool, m.variant).state_dict()
    weights = clean_state_dict(weights)
    problem = weights_mismatch(shapes, weights)
    if problem:
        raise UserError(f"{where}: its weights are not those of the model its settings describe ({m.describe()}, "
                        f"{num_classes} classes): {problem}; the file is damaged or not one of ours")
    model = build_model_from_config(model_cfg, num_classes, device)
    model.load_state_dict(weights)
    return model.eval()


def weights_mismatch(expected: dict[str, torch.Tensor], weights: dict, ignore: tuple[str, ...] = ()) -> str | None:
    """What keeps `weights` from loading into a model whose state dict is `expected` (tensors, on any device: only
    their shapes are read), in a phrase; None when they fit. `ignore`: names not compared."""
    not_tensors = [k for k, v in weights.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        return f"{len(not_tensors)} entries are not named tensors ({str(not_tensors[:3])[:80]})"
    # BatchNorm fills in a missing num_batches_tracked (torchvision's and timm's files have none)
    missing = [k for k in expected if k not in weights and k not in ignore and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in expected and k not in ignore]
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    for key, tensor in expected.items():
        if key not in ignore and weights[key].shape != tensor.shape:
            return f"{key} is {list(weights[key].shape)} there, {list(tensor.shape)} in the model"
    return None


class BlurConv2d(nn.Conv2d):
    """A strided conv that first low-passes its input with a 3x3 binomial filter (Zhang 2019, "Making
    Convolutional Networks Shift-Invariant Again"; as FFCV's ResNet-50 recipes use it). A subclass rather
    than a wrapper, and the filter a non-persistent buffer, so parameter names and state dicts stay
    torchvision's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :]) / 16
        self.register_buffer("blur", kernel.expand(self.in_channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = nn.functional.conv2d(x, self.blur.to(x.dtype), padding=1, groups=self.in_channels)
        return super().forward(blurred)


def apply_blurpool(model: nn.Module) -> nn.Module:
    """Replace every strided conv with at least 16 input channels (FFCV's rule: not the stem) by a BlurConv2d."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Conv2d and max(child.stride) > 1 and child.in_channels >= 16:
                blur = BlurConv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                  child.padding, bias=child.bias is not None)
                blur.weight = child.weight
                setattr(parent, name, blur)
    return model


def load_weights(model: nn.Module, path: str) -> bool:
    """Load a torchvision/timm ResNet state dict, or one of our checkpoints, into `model` to fine-tune it.
    A classifier head of another shape (another number of classes) is left freshly initialised; any other
    mismatch is an error. Returns whether the head was replaced."""
    if compressed_records(path):
        raise UserError(f"{path}: holds compressed records, which torch.save never writes (loading them could take "
                        "any amount of memory), so it was not loaded; save the weights again with torch.save")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and plain data
        raise UserError(f"{path}: holds pickled objects other than weights (code, possibly), so it was not "
                        "loaded; use a state dict saved with torch.save(model.state_dict(), ...)") from e
    except Exception as e:  # torch raises several types for unreadable files
        raise UserError(f"{path}: not a loadable weights file ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    for key in ("model", "state_dict"):  # our checkpoints; training scripts' {"state_dict": ...}
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict of weights; use a file saved with "
                        "torch.save(model.state_dict(), ...)")
    state = clean_state_dict(state)
    own = model.state_dict()
    head = [k for k in ("fc.weight", "fc.bias") if isinstance(state.get(k), torch.Tensor)
            and k in own and state[k].shape != own[k].shape]
    problem = weights_mismatch(own, state, ignore=tuple(head))
    if problem:
        raise UserError(f"{path}: not weights of this architecture ({problem}); check model.name, model.width and "
                        "model.variant")
    model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
    return bool(head)


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes wrappers add to names."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while isinstance(key, str) and key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned
