"""The shifted-support control of the evaluation (`fss evaluate --support-control shifted`): each
episode is scored with the previous episode's support, so a method that matches its support
loses accuracy and one that ignores it scores exactly the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fss.errors import ConfigError
from fss.evaluation import EvalSettings, ShiftedSupports, evaluate_model, make_protocol

CPU = torch.device("cpu")


def _batch(ids: list[int], classes: list[int]) -> dict:
    n = len(ids)
    images = torch.tensor(ids, dtype=torch.float32).view(n, 1, 1, 1, 1).expand(n, 1, 3, 2, 2)
    return {"support_images": images, "support_masks": images[:, :, 0].long(),
            "query_images": torch.zeros(n, 3, 2, 2), "class_ids": torch.tensor(classes)}


def test_each_episode_gets_the_previous_episodes_support_across_batches():
    shift = ShiftedSupports()
    seen = []
    for ids, classes in (([0, 1, 2], [5, 5, 6]), ([3, 4, 5], [7, 8, 8]), ([6], [9])):
        batch = _batch(ids, classes)
        out = shift(batch)
        assert out["query_images"] is batch["query_images"] and torch.equal(out["class_ids"], batch["class_ids"])
        assert torch.equal(out["support_masks"], out["support_images"][:, :, 0].long())
        seen += [int(v) for v in out["support_images"][:, 0, 0, 0, 0]]
    # the first episode borrows its batch's last; every other one its predecessor's
    assert seen == [2, 0, 1, 2, 3, 4, 5]
    # borrowed class equals own class for episodes 1 (5 from 0) and 5 (8 from 4)
    assert shift.same_class == 2


class _QueryOnly(torch.nn.Module):
    """Predicts from the query alone: blind to the support."""

    def predict(self, support_images, support_masks, query_images):
        score = query_images.mean(1, keepdim=True)
        return torch.cat([-score, score], dim=1)


class _ColourMatcher(torch.nn.Module):
    """Labels a query pixel foreground when its colour is nearer the support's mean foreground
    colour than its mean background colour: uses the support, and colour is a class cue here."""

    def predict(self, support_images, support_masks, query_images):
        images, masks = support_images[:, 0], support_masks[:, 0]

        def mean(where):
            w = where.unsqueeze(1).float()
            return (images * w).sum((2, 3)) / w.sum((2, 3)).clamp(min=1)

        fg, bg = mean(masks == 1), mean(masks == 0)
        dist = [-(query_images - p[:, :, None, None]).square().sum(1) for p in (bg, fg)]
        return torch.stack(dist, dim=1)


def _data(root):
    from fss.data.access import open_prepared

    return open_prepared(root, 0, "val", cache=True)


def test_shifted_supports_cost_a_support_matching_method_and_not_a_blind_one(synthetic_root):
    data, proto = _data(synthetic_root), make_protocol("pfenet", "synthetic", episodes=24, size=33)
    blind = [evaluate_model(_QueryOnly(), data, proto, EvalSettings(batch_size=4, support_control=c))
             for c in ("none", "shifted")]
    assert blind[0]["miou"] == blind[1]["miou"] and blind[0]["fb_iou"] == blind[1]["fb_iou"]
    assert "support_control" not in blind[0]
    assert blind[1]["support_control"]["name"] == "shifted"
    assert 0 <= blind[1]["support_control"]["same_class_episodes"] < 24

    own, shifted = (evaluate_model(_ColourMatcher(), data, proto, EvalSettings(batch_size=4, support_control=c))
                    for c in ("none", "shifted"))
    assert shifted["miou"] < own["miou"]


def test_an_unknown_control_is_refused_in_one_line(synthetic_root, capsys):
    from pipeline.evaluate import _default_out
    from tests.pipeline.pipeline_helpers import run_fss

    with pytest.raises(ConfigError, match="support_control='swapped' is unknown; choose one of: none, shifted"):
        EvalSettings(support_control="swapped")
    code, _, err = run_fss(["evaluate", "--run", "nowhere", "--support-control", "swapped"], capsys)
    assert code != 0 and "--support-control 'swapped'; choose one of: none, shifted." in err
    # the control never overwrites the run's own evaluation file by default
    assert _default_out(Path("r"), None, "pfenet", 1, "shifted") == Path("r/eval-pfenet-1shot-shifted-support.json")
    assert _default_out(Path("r"), None, "pfenet", 1) == Path("r/eval-pfenet-1shot.json")
