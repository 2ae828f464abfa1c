"""Real backbones: stage shapes and strides, reference layouts, strict weight loading.

Synthetic weight files are built from the key/shape listings of the reference formats
(``spec/checkpoints/*.txt``) or from torchvision's own networks, so the key names and
shapes checked are the real formats'; tensor values are random.
"""

from __future__ import annotations

import math
import os
import urllib.error
from pathlib import Path

import pytest
import torch

from tests.conftest import CHECKPOINT_KEYS
import torchvision
from torch import nn

from fss.errors import CheckpointError, ConfigError
from fss.models.backbones import build_backbone, list_backbones
from fss.models.backbones.resnet import ResNetBackbone
from fss.models.backbones.vgg import PANetVGG16, PFENetVGG16BN, panet_key_to_backbone_key
from fss.models.backbones.weights import load_state_dict_file

STAGES = ("layer0", "layer1", "layer2", "layer3", "layer4")
REPO = Path(__file__).resolve().parents[2]
_LISTING_DIRS = [CHECKPOINT_KEYS]




def listing(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    """Parse ``key<TAB>shape<TAB>dtype`` lines of a reference key listing."""
    for d in _LISTING_DIRS:
        if (d / name).is_file():
            rows = []
            for line in (d / name).read_text().splitlines():
                if line.strip():
                    key, shape, dtype = line.split("\t")
                    dims = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
                    rows.append((key, dims, dtype))
            return rows
    pytest.fail(f"key listing {name} not found (looked in {', '.join(map(str, _LISTING_DIRS))})")


def synthetic_state_dict(rows, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the listed shapes; huge classifier matrices as zero-stride views
    (right shape, tiny file)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape, dtype in rows:
        if dtype == "int64":
            out[key] = torch.tensor(7, dtype=torch.int64).expand(shape).clone()
        elif math.prod(shape) > 5_000_000:
            out[key] = torch.zeros(1).expand(shape)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.05
    return out


def own_shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def resnet50v2_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "resnet50_v2.pth"
    torch.save(synthetic_state_dict(listing("resnet50_v2_backbone.txt")), path)
    return path


@pytest.fixture(scope="module")
def torchvision_resnet50_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("w") / "resnet50-0676ba61.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def v2_net50() -> ResNetBackbone:
    """Shared by tests that only read the network (or are refused before it is touched)."""
    return ResNetBackbone(50, deep_stem=True)


@pytest.fixture(scope="module")
def v2_net101() -> ResNetBackbone:
    return ResNetBackbone(101, deep_stem=True).eval()


# ---------------------------------------------------------------- shapes and layouts

EXPECTED_SIZES = {  # input side -> spatial side of layer0..layer4
    "resnet50": (33, (9, 9, 5, 5, 5)),  # strides 4, 4, 8, 8, 8 (dilated, CPU-slow: small input)
    "resnet50v2": (33, (9, 9, 5, 5, 5)),
    "vgg16": (65, (33, 17, 9, 9, 9)),  # PANet: strides 2, 4, 8, 8, 8
    "vgg16bn": (65, (33, 17, 9, 5, 5)),  # PFENet slices: strides 2, 4, 8, 16, 16 (ceil-mode pools)
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_stage_shapes_and_strides(name):
    net = build_backbone(name).eval()
    size, sides = EXPECTED_SIZES[name]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = net(x)
        y = x  # calling the stages in sequence is the forward
        for stage in STAGES:
            y = getattr(net, stage)(y)
    assert torch.equal(y, out["layer4"])
    assert list(out) == list(STAGES)
    for stage, side in zip(STAGES, sides):
        assert out[stage].shape == (1, net.stage_channels[stage], side, side), stage
        assert side == math.ceil(size / net.stage_strides[stage])


def test_resnet101v2_light(v2_net101):
    with torch.no_grad():
        out = v2_net101(torch.randn(1, 3, 33, 33))
    assert [o.shape[-1] for o in out.values()] == [9, 9, 5, 5, 5]
    assert out["layer4"].shape[1] == 2048 and len(v2_net101.layer3) == 23
    assert build_backbone("resnet101").stage_channels["layer0"] == 64


def test_list_backbones_and_unknown_name():
    assert set(list_backbones()) == {"small", "resnet50", "resnet101", "resnet50v2", "resnet101v2", "vgg16", "vgg16bn"}
    with pytest.raises(ConfigError, match="unknown backbone 'resnet18'"):
        build_backbone("resnet18")


def test_resnet_dilation_matches_pfenet_procedure(torchvision_resnet50_file):
    """Our dilated ResNet equals a plain torchvision ResNet-50 modified the way PFENet's
    PFENet.py does (every layer3/layer4 conv2 dilated 2/4 with stride 1, downsample stride 1)."""
    ref = torchvision.models.resnet50(weights=None)
    ref.load_state_dict(torch.load(torchvision_resnet50_file, weights_only=True))
    for layer, d in ((ref.layer3, 2), (ref.layer4, 4)):
        for n, m in layer.named_modules():
            if "conv2" in n:
                m.dilation, m.padding, m.stride = (d, d), (d, d), (1, 1)
            elif "downsample.0" in n:
                m.stride = (1, 1)
    ref.eval()
    net = build_backbone("resnet50", weights=str(torchvision_resnet50_file)).eval()
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        r = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        r = ref.layer4(ref.layer3(ref.layer2(ref.layer1(r))))
        torch.testing.assert_close(net(x)["layer4"], r)
    assert net.layer3[0].conv2.dilation == (2, 2) and net.layer4[0].conv2.dilation == (4, 4)


def test_torchvision_dilation_rule_matches_replace_stride_with_dilation(torchvision_resnet50_file):
    """The knob dilation_rule="torchvision" equals torchvision's own dilated ResNet-50."""
    state = torch.load(torchvision_resnet50_file, weights_only=True)
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    ref.load_state_dict(state)
    ref.eval()
    net = ResNetBackbone(50, dilation_rule="torchvision")
    load_state_dict_file(net, torchvision_resnet50_file, kind="resnet50")
    net.eval()
    assert net.layer3[0].conv2.dilation == (1, 1) and net.layer3[1].conv2.dilation == (2, 2)
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        r = ref.layer4(ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))
        torch.testing.assert_close(net(x)["layer4"], r)
    with pytest.raises(ConfigError, match="dilation_rule"):
        ResNetBackbone(50, dilation_rule="deeplab")


def test_v2_stem_layout(v2_net50):
    net = v2_net50
    convs = [m for m in net.layer0 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 64, (3, 3), (2, 2)), (64, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))]
    assert net.layer1[0].conv1.in_channels == 128
    assert isinstance(net.layer0[-1], nn.MaxPool2d)
    # the stem is registered once, under the file's names
    assert "conv3.weight" in net.state_dict() and not any(k.startswith("layer0") for k in net.state_dict())


def test_panet_vgg16_layout():
    net = PANetVGG16().eval()
    pools = [net.features[i] for i in (1, 3, 5, 7)]
    assert [(p.kernel_size, p.stride, p.padding) for p in pools] == [(3, 2, 1)] * 3 + [(3, 1, 1)]
    conv5 = [m for m in net.features[8] if isinstance(m, nn.Conv2d)]
    assert all(c.dilation == (2, 2) and c.padding == (2, 2) for c in conv5)
    assert not isinstance(net.features[8][-1], nn.ReLU) and len(net.features) == 9
    with torch.no_grad():
        out = net(torch.randn(1, 3, 33, 33))
    assert out["layer3"].min() >= 0  # ReLU then pool 4
    assert out["layer4"].min() < 0  # no ReLU after conv5_3


def test_vgg16bn_pool_rounding_option():
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        floor = PFENetVGG16BN(pool_ceil_mode=False).eval()(x)
    assert [o.shape[-1] for o in floor.values()] == [32, 16, 8, 4, 4]


def test_bf16_autocast_forward():
    net = build_backbone("vgg16").eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(1, 3, 33, 33))
    assert out["layer4"].dtype == torch.bfloat16 and torch.isfinite(out["layer4"].float()).all()


# ------------------------------------------------------- keys against the reference formats

@pytest.mark.parametrize("listing_name,net", [("resnet50_v2_backbone.txt", "v2_net50"), ("resnet101_v2_backbone.txt", "v2_net101")])
def test_v2_keys_equal_the_listing(listing_name, net, request):
    rows = {k: s for k, s, _ in listing(listing_name) if not k.startswith("fc.")}
    assert own_shapes(request.getfixturevalue(net)) == rows


def test_vgg16bn_keys_equal_the_listing():
    rows = {k: s for k, s, _ in listing("vgg16_bn_backbone.txt") if not k.startswith("classifier.")}
    assert own_shapes(PFENetVGG16BN()) == rows


def test_panet_keys_map_onto_vgg16():
    rows = listing("panet_vgg16.txt")
    shapes = own_shapes(PANetVGG16())
    mapped = {panet_key_to_backbone_key("module." + k): s for k, s, _ in rows}
    assert mapped == shapes and list(mapped) == list(shapes)  # same keys in the same order
    assert panet_key_to_backbone_key("module.other.weight") is None


@pytest.mark.parametrize("listing_name,net", [
    ("pfenet_resnet50.txt", lambda request: request.getfixturevalue("v2_net50")),
    ("pfenet_vgg16bn.txt", lambda request: PFENetVGG16BN()),
])
def test_pfenet_stage_keys_map_onto_backbone(listing_name, net, request):
    """PFENet's model keys layer0..layer4.* name exactly the backbone's parameters."""
    net = net(request)
    shapes = own_shapes(net)
    rows = [(k.removeprefix("module."), s) for k, s, _ in listing(listing_name)]
    stage_rows = {k: s for k, s in rows if k.split(".")[0] in STAGES}
    mapped = {net.stage_key_to_state_key(k): s for k, s in stage_rows.items()}
    for k, s in mapped.items():
        assert shapes[k] == s, k
    params_and_stats = {k for k in shapes if not k.endswith("num_batches_tracked")}
    assert params_and_stats <= set(mapped)


# -------------------------------------------------------------------- weight loading

def test_load_v2_file_all_keys(resnet50v2_file):
    file = torch.load(resnet50v2_file, weights_only=True)
    net = build_backbone("resnet50v2", weights=str(resnet50v2_file))
    assert net.load_report["matched"] == net.load_report["total"] == 330
    assert net.load_report["ignored"] == ["fc.weight", "fc.bias"] and net.load_report["absent"] == []
    assert torch.equal(net.conv3.weight, file["conv3.weight"])
    assert torch.equal(net.layer0[6].weight, file["conv3.weight"])  # PFENet's layer0.6
    assert torch.equal(net.layer4[2].bn3.running_var, file["layer4.2.bn3.running_var"])


def test_load_v2_file_without_batch_counters(tmp_path, resnet50v2_file):
    state = torch.load(resnet50v2_file, weights_only=True)
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet50_v2_old.pth"
    torch.save(old, path)
    report = build_backbone("resnet50v2", weights=str(path)).load_report
    assert report["total"] == 330 and report["matched"] == 330 - 55
    assert len(report["absent"]) == 55 and all(k.endswith("num_batches_tracked") for k in report["absent"])


def test_load_torchvision_resnet50(torchvision_resnet50_file):
    file = torch.load(torchvision_resnet50_file, weights_only=True)
    net = build_backbone("resnet50", weights=str(torchvision_resnet50_file))
    assert net.load_report["matched"] == net.load_report["total"] == len(file) - 2
    assert net.load_report["ignored"] == ["fc.weight", "fc.bias"]
    assert torch.equal(net.layer3[5].conv2.weight, file["layer3.5.conv2.weight"])


def test_load_vgg16bn_file_with_classifier(tmp_path):
    state = synthetic_state_dict(listing("vgg16_bn_backbone.txt"), seed=1)
    path = tmp_path / "vgg16_bn-6c64b313.pth"
    torch.save(state, path)
    net = build_backbone("vgg16bn", weights=str(path))
    report = net.load_report
    assert report["matched"] == report["total"] == 91
    assert sorted(report["ignored"]) == sorted(k for k in state if k.startswith("classifier."))
    assert torch.equal(net.layer2[3].weight, state["features.17.weight"])  # PFENet's layer2.3
    assert torch.equal(net.layer4[7].running_mean, state["features.41.running_mean"])


def _torchvision_vgg16_file(path: Path) -> dict:
    """A file in torchvision's vgg16 format: features.* of torchvision's VGG16 then the
    classifier keys (zero-stride tensors of the real shapes, to keep the file small)."""
    from torchvision.models.vgg import cfgs, make_layers

    state = {f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}
    for i, shape in ((0, (4096, 25088)), (3, (4096, 4096)), (6, (1000, 4096))):
        state[f"classifier.{i}.weight"] = torch.zeros(1).expand(shape)
        state[f"classifier.{i}.bias"] = torch.zeros(shape[0])
    torch.save(state, path)
    return state


def test_load_vgg16_by_position(tmp_path):
    path = tmp_path / "vgg16-397923af.pth"
    state = _torchvision_vgg16_file(path)
    net = build_backbone("vgg16", weights=str(path))
    assert net.load_report["matched"] == net.load_report["total"] == 26
    assert net.load_report["ignored"] == [k for k in state if k.startswith("classifier.")]
    # conv3_1 is torchvision's features.10 and PANet's features.4.0
    assert torch.equal(net.features[4][0].weight, state["features.10.weight"])
    assert torch.equal(net.features[8][4].bias, state["features.28.bias"])


def test_vgg16bn_file_refused_by_panet_vgg16(tmp_path):
    path = tmp_path / "vgg16_bn.pth"
    torch.save({k: v for k, v in PFENetVGG16BN().state_dict().items()}, path)
    with pytest.raises(CheckpointError, match=r"tensor 2 features\.1\.weight .* vgg16-397923af\.pth"):
        build_backbone("vgg16", weights=str(path))


def test_torchvision_file_refused_by_v2_and_reverse(torchvision_resnet50_file, resnet50v2_file, v2_net50):
    with pytest.raises(CheckpointError, match=r"torchvision ResNet \(7x7 conv1\).*v2 deep-stem ResNet \(3x3 conv1\).*'resnet50'"):
        load_state_dict_file(v2_net50, torchvision_resnet50_file, kind="resnet50v2")
    with pytest.raises(CheckpointError, match=r"v2 deep-stem ResNet \(3x3 conv1\).*torchvision ResNet \(7x7 conv1\).*'resnet50v2'"):
        build_backbone("resnet50", weights=str(resnet50v2_file))


def test_wrong_depth_refused(resnet50v2_file, v2_net101):
    with pytest.raises(CheckpointError, match=r"v2 deep-stem ResNet-50 .*'resnet101v2'.*keys missing \(e\.g\. layer3\.6\."):
        load_state_dict_file(v2_net101, resnet50v2_file, kind="resnet101v2")


def test_misshapen_key_refused(tmp_path):
    state = build_backbone("small").state_dict()
    state["layer2.0.weight"] = torch.zeros(64, 32, 1, 1)
    torch.save(state, tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match=r"1 with other shapes \(e\.g\. layer2\.0\.weight: \(64, 32, 1, 1\)"):
        build_backbone("small", weights=str(tmp_path / "small.pth"))


def test_small_round_trip_and_extra_key_refused(tmp_path):
    src = build_backbone("small")
    torch.save(src.state_dict(), tmp_path / "small.pth")
    net = build_backbone("small", weights=str(tmp_path / "small.pth"))
    assert net.load_report["matched"] == net.load_report["total"] == 42
    assert torch.equal(net.layer4[0].weight, src.layer4[0].weight)
    torch.save({**src.state_dict(), "fc.weight": torch.zeros(2, 2)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e\.g\. fc\.weight\)"):
        build_backbone("small", weights=str(tmp_path / "extra.pth"))


def test_missing_truncated_and_container_files_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_backbone("vgg16bn", weights=str(tmp_path / "nope.pth"))
    torch.save(build_backbone("small").state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        build_backbone("small", weights=str(tmp_path / "cut.pth"))
    torch.save({"epoch": 50, "state_dict": {"module.layer0.0.weight": torch.zeros(1)}}, tmp_path / "pfenet.pth")
    with pytest.raises(CheckpointError, match="trained-model checkpoint"):
        build_backbone("resnet50v2", weights=str(tmp_path / "pfenet.pth"))


def test_unknown_load_kind():
    with pytest.raises(ConfigError, match="weight kind"):
        load_state_dict_file(nn.Linear(1, 1), "x.pth", kind="resnet18")


# ---------------------------------------------------------------- weights="imagenet"

def _offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_imagenet_not_cached_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)
    cache = tmp_path / "hub" / "checkpoints"
    with pytest.raises(CheckpointError) as err:
        build_backbone("resnet50", weights="imagenet")
    msg = str(err.value)
    assert "resnet50-0676ba61.pth" in msg and str(cache) in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match=r"vgg16-397923af\.pth"):
        build_backbone("vgg16", weights="imagenet")
    with pytest.raises(CheckpointError, match=r"no torchvision ImageNet weights; pass the path of resnet50_v2\.pth"):
        build_backbone("resnet50v2", weights="imagenet")


def test_imagenet_from_cache(tmp_path, monkeypatch, torchvision_resnet50_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _offline)  # must not be needed
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet50-0676ba61.pth").write_bytes(torchvision_resnet50_file.read_bytes())
    net = build_backbone("resnet50", weights="imagenet")
    assert net.load_report["matched"] == net.load_report["total"]
    assert net.load_report["source"] == str(cache / "resnet50-0676ba61.pth")
    file = torch.load(torchvision_resnet50_file, weights_only=True)
    assert torch.equal(net.bn1.running_mean, file["bn1.running_mean"])
