import pytest
import torch

from imagenet_resnet.models import ARCHITECTURES, Bottleneck, build_model, clean_state_dict

# torchvision's published parameter counts.
EXPECTED_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_parameter_count(name):
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]


def test_resnet50_names_and_shapes_follow_torchvision():
    state = build_model("resnet50").state_dict()
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.num_batches_tracked": (),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.weight": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert len(state) == 320  # torchvision resnet50's state dict has 320 entries


def test_v15_stride_on_3x3_conv():
    block = build_model("resnet50").layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_zero_init_residual_zeroes_last_bn_of_every_block():
    model = build_model("resnet50", zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == sum(ARCHITECTURES["resnet50"][1])
    assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)
    assert torch.count_nonzero(build_model("resnet50").layer1[0].bn3.weight) > 0


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=7, width=8).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert out.shape == (2, 7)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_clean_state_dict_strips_wrapper_prefixes():
    state = {"module._orig_mod.fc.weight": torch.zeros(1), "_orig_mod.conv1.weight": torch.ones(1)}
    assert set(clean_state_dict(state)) == {"fc.weight", "conv1.weight"}


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="resnet50"):
        build_model("resnet51")


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_torchvision_weights_load_and_give_the_same_outputs(name):
    """Runs wherever torchvision imports (not with our CPU torch): same names, same function."""
    try:
        import torchvision
    except Exception as e:  # torchvision's compiled ops fail to load against a mismatched torch
        pytest.skip(f"torchvision does not import here: {type(e).__name__}")
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    ours = build_model(name).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)
    # and ours load into torchvision
    reference.load_state_dict(ours.state_dict(), strict=True)


def test_resnet_d_has_the_deep_stem_and_average_pool_shortcuts_under_timms_names():
    model = build_model("resnet50", variant="d")
    state = model.state_dict()
    expected = {  # timm's resnet50d
        "conv1.0.weight": (32, 3, 3, 3), "conv1.1.running_mean": (32,), "conv1.3.weight": (32, 32, 3, 3),
        "conv1.6.weight": (64, 32, 3, 3), "bn1.weight": (64,),
        "layer1.0.downsample.1.weight": (256, 64, 1, 1), "layer2.0.downsample.2.running_var": (512,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert sum(p.numel() for p in model.parameters()) == 25_576_264  # timm's resnet50d
    first = model.layer2[0].downsample
    assert isinstance(first[0], torch.nn.AvgPool2d) and first[1].stride == (1, 1)
    assert isinstance(model.layer1[0].downsample[0], torch.nn.Identity)  # no downsampling in the first stage
    # The shortcut now sees every input pixel: a 2x2 average, where ResNet-B's strided 1x1 conv takes one in four.
    x = torch.zeros(1, 256, 8, 8)
    x[..., 1, 1] = 1.0  # a pixel a stride-2 1x1 conv skips
    conv = first[1]
    with torch.no_grad():
        conv.weight.fill_(1.0)
        assert first[1](first[0](x)).abs().sum() > 0
        plain = build_model("resnet50").layer2[0].downsample[0]
        plain.weight.fill_(1.0)
        assert plain(x).abs().sum() == 0


@pytest.mark.parametrize("variant", ["c", "d"])
def test_deep_stem_keeps_the_output_shape(variant):
    for name in ("resnet18", "resnet50"):
        model = build_model(name, num_classes=7, width=16, variant=variant, zero_init_residual=True).eval()
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape[-2:] == (2, 2)


def test_resnet_c_keeps_torchvisions_shortcuts():
    model = build_model("resnet50", variant="c")
    assert isinstance(model.conv1, torch.nn.Sequential)
    assert model.layer2[0].downsample[0].stride == (2, 2)


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="variant 'e'"):
        build_model("resnet50", variant="e")


def test_timm_resnet50d_weights_load_and_give_the_same_outputs():
    """Runs wherever timm imports (not with our CPU torch)."""
    try:
        import timm
    except Exception as e:  # timm needs torchvision, whose compiled ops fail against a mismatched torch
        pytest.skip(f"timm does not import here: {type(e).__name__}")
    torch.manual_seed(0)
    reference = timm.create_model("resnet50d", pretrained=False).eval()
    ours = build_model("resnet50", variant="d").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)
