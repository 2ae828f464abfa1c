"""The ``feature_dropout`` knob: the Dropout2d after the compared features (reference 0.5).

In training, query and support each lose their own random channels there; 0 turns it off
(the embedded benchmark's setting, docs/results.md). Evaluation never drops.
"""

from __future__ import annotations

import pytest
import torch

from fss.models import create_model

# method -> function of (model, images) giving the features the knob's dropout acts on
FEATURES = {
    "pfenet": lambda m, x: m.reduce_query(_mid(m, x)),
    "apanet": lambda m, x: m.reduce_support(_mid(m, x)),
    "celp": lambda m, x: m.reduce_query(_mid(m, x)),
    "canet": lambda m, x: m.extract_features(x),
    "simpropnet": lambda m, x: m.extract_features(x),
    "dpnet_canet": lambda m, x: m.encode(x)[0],
    "dpnet_pfenet": lambda m, x: m.encode(x)[0],
}


def _mid(model, images):
    bb = model.backbone
    with torch.no_grad():
        layer2 = bb.layer2(bb.layer1(bb.layer0(images)))
        layer3 = bb.layer3(layer2)
    layer2 = torch.nn.functional.interpolate(layer2, size=layer3.shape[-2:], mode="bilinear", align_corners=True)
    return torch.cat([layer3, layer2], dim=1)


@pytest.mark.parametrize("method", sorted(FEATURES))
def test_feature_dropout_knob_sets_the_training_dropout_of_the_compared_features(method):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 33, 33)
    features = FEATURES[method]
    reference = create_model(method, backbone="small", shot=1)
    assert reference.feature_dropout == 0.5
    off = create_model(method, backbone="small", shot=1, feature_dropout=0.0)
    off.load_state_dict(reference.state_dict())  # same weights: the knob holds no parameter

    with torch.no_grad():
        off.eval()
        clean = features(off, images)
        off.train()
        assert torch.equal(features(off, images), clean)  # 0: training computes eval's features
        reference.train()
        dropped = features(reference, images)
    zeroed = dropped.flatten(2).abs().sum(-1) == 0  # whole channels, as Dropout2d
    kept = ~zeroed & (clean.flatten(2).abs().sum(-1) > 0)
    assert 0.2 < zeroed.float().mean() < 0.8
    scale = (dropped.flatten(2)[kept] / clean.flatten(2)[kept].clamp_min(1e-12))
    nonzero = clean.flatten(2)[kept] > 1e-6
    assert torch.allclose(scale[nonzero], torch.full_like(scale[nonzero], 2.0), rtol=1e-4)


@pytest.mark.parametrize("value", [-0.1, 0.95])
def test_feature_dropout_out_of_range_is_refused(value):
    with pytest.raises(Exception, match="feature_dropout"):
        create_model("pfenet", backbone="small", shot=1, feature_dropout=value)
