"""Why do the CANet-family heads ignore their support on the embedded benchmark? Numbers.

    uv run python tests/bench/diagnose_support.py --clone /tmp/par5 --shortcut --out /tmp/support-diag.json
    uv run python tests/bench/diagnose_support.py --clone /tmp/par5 --runs /tmp/myruns --methods canet --folds 0

Reads trained runs (``RUNS/<method>/fold<k>/model.pt``, default ``CLONE/runs``), the embedded
dataset (``CLONE/data/synthetic``) and the pretrained backbone (``CLONE/pretrained/...``) of a
clone of the project, read-only. Every number is on validation episodes (the run's
``validation`` settings: the holdout list, seed 123; ``--episodes`` of them), never on the test
episodes. Per fold, for CANet trained and untrained (seed 0, the run's knobs and backbone):

a. ``separation``: cosine of the support's masked-average prototype to the query's foreground
   and background features, with the episode's own support and with another class's, in the
   frozen backbone (``layer2``+``layer3``, as CANet concatenates them) and after CANet's trained
   feature layer; ``retrieval``: how often the query's foreground mean feature is nearest
   (cosine) to its own class's mean prototype among the fold's novel classes (chance 1/5);
b. ``concat``: per-location norms of the query feature and of the tiled prototype at the
   dense comparison's concatenation, and how much the prototype changes with another class;
c. ``dense_compare``: units dead after the ReLU that follows the concatenation (per
   location, and channels dead at every location), the variance of the first conv's output
   that comes from the query channels and from the prototype channels, and the relative change
   of the comparison's output with the prototype zeroed or replaced by another class's;
   ``gradient``: in train mode, the norm of the loss gradient at the concatenation's prototype
   channels against its query channels;
e. ``swap`` (every method): validation mIoU with the episode's own support and with the
   previous episode's (``fss evaluate --support-control shifted``'s control), the fraction of
   query pixels whose prediction flips, and the mean change of the foreground probability.

Not a test (pytest collects test_*.py only).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from fss.data.access import open_prepared
from fss.data.episodes import EpisodeLoader
from fss.evaluation import EvalSettings, ShiftedSupports, evaluate_model, make_protocol
from fss.metrics import IoUMeter
from fss.models.blocks import masked_average_pool
from fss.models.checkpoints import load_model_file
from fss.models.registry import create_model
from pipeline.config import config_from_dict

CANET_FAMILY = ("canet",)
EPS = 5e-4


def load_run(runs: Path, method: str, fold: int):
    run = runs / method / f"fold{fold}"
    config = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    model, _ = load_model_file(run / "model.pt")
    return model.eval(), config


def untrained_like(config, clone: Path):
    """The run's model before its first step: seed ``train.seed``, its knobs and backbone weights."""
    torch.manual_seed(config.train.seed)
    weights = clone / config.backbone_weights if config.backbone_weights else None
    return create_model(config.method, backbone=config.backbone, shot=config.shot,
                        backbone_weights=str(weights) if weights else None, **config.knobs).eval()


def validation_data(config, clone: Path, episodes: int):
    data = open_prepared(clone / "data" / config.dataset, config.fold, config.validation.split,
                         dataset=config.dataset, cache=True)
    protocol = make_protocol(config.test.protocol, config.dataset, episodes=episodes,
                             size=config.test.size, runs=1, seed=config.validation.seed)
    return data, protocol


def batches_of(data, protocol, batch_size: int = 50) -> list[dict]:
    loader = EpisodeLoader(protocol.episode_dataset(data, 1, run=0), batch_size=batch_size, shuffle=False,
                           num_workers=0, pin=False, generator=torch.Generator().manual_seed(0))
    keys = ("support_images", "support_masks", "query_images", "query_masks", "class_ids")
    return [{k: b[k] for k in keys} for b in loader]


def cat_batches(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def other_class_index(classes: torch.Tensor) -> torch.Tensor:
    """For each episode, the next episode (cyclically) whose class differs."""
    n = len(classes)
    out = torch.empty(n, dtype=torch.long)
    for i in range(n):
        j = (i + 1) % n
        while classes[j] == classes[i] and j != i:
            j = (j + 1) % n
        out[i] = j
    return out


def mask_at(masks: torch.Tensor, size, value: int) -> torch.Tensor:
    """``masks == value`` resized bilinearly (align_corners=True, as CANet) to ``size`` ``[N,1,h,w]``."""
    return F.interpolate((masks == value).float().unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=True)


@torch.no_grad()
def canet_features(model, batch: dict) -> dict:
    """Backbone (layer2+layer3) and CANet-feature maps, prototypes and masks of every episode."""
    s_img, q_img = batch["support_images"][:, 0], batch["query_images"]
    out = {}
    for name, images in (("support", s_img), ("query", q_img)):
        layer2, layer3 = model.backbone_features(images)
        raw = torch.cat([F.interpolate(layer2, size=layer3.shape[-2:], mode="bilinear", align_corners=True),
                         layer3], dim=1)
        out[name] = {"raw": raw, "reduced": model.feature_reduce(raw)}
    size = out["query"]["raw"].shape[-2:]
    out["support_fg"] = mask_at(batch["support_masks"][:, 0], size, 1)
    out["query_fg"] = mask_at(batch["query_masks"], size, 1) > 0.5
    out["query_bg"] = mask_at(batch["query_masks"], size, 0) > 0.5
    for space in ("raw", "reduced"):
        out[f"proto_{space}"] = masked_average_pool(out["support"][space], out["support_fg"], EPS)
    return out


def _region_cos(feats: torch.Tensor, protos: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per episode: mean cosine of the prototype to the region's feature vectors (NaN if empty)."""
    cos = F.cosine_similarity(feats, protos[..., None, None], dim=1)  # N, h, w
    region = region[:, 0].float()
    return (cos * region).sum(dim=(1, 2)) / region.sum(dim=(1, 2)).where(region.sum(dim=(1, 2)) > 0,
                                                                         torch.tensor(float("nan")))


def separation(feat: dict, classes: torch.Tensor) -> dict:
    """(a) own/other-class prototype cosines to query fg/bg, and class retrieval accuracy."""
    other = other_class_index(classes)
    out = {}
    for space in ("raw", "reduced"):
        q, p = feat["query"][space], feat[f"proto_{space}"]
        row = {}
        for who, protos in (("own", p), ("other_class", p[other])):
            for region in ("fg", "bg"):
                row[f"{who}_{region}"] = float(_region_cos(q, protos, feat[f"query_{region}"]).nanmean())
        row["own_fg_minus_bg"] = row["own_fg"] - row["own_bg"]
        row["own_minus_other_on_fg"] = row["own_fg"] - row["other_class_fg"]
        q_fg = masked_average_pool(q, feat["query_fg"].float(), EPS)
        ids = sorted(set(classes.tolist()))
        means = torch.stack([p[classes == c].mean(dim=0) for c in ids])
        nearest = F.cosine_similarity(q_fg[:, None], means[None], dim=2).argmax(dim=1)
        hit = torch.tensor(ids)[nearest] == classes
        valid = feat["query_fg"].flatten(1).any(dim=1)
        row["retrieval_accuracy"] = float(hit[valid].float().mean())
        row["retrieval_chance"] = 1.0 / len(ids)
        out[space] = row
    return out


def _conv_part(conv: torch.nn.Conv2d, x: torch.Tensor, channels: slice) -> torch.Tensor:
    return F.conv2d(x, conv.weight[:, channels], None, conv.stride, conv.padding, conv.dilation)


@torch.no_grad()
def dense_compare_stats(model, feat: dict, classes: torch.Tensor) -> dict:
    """(b) and (c): norms at the concatenation; dead units, variance shares, output changes."""
    q, p = feat["query"]["reduced"], feat["proto_reduced"]
    c = q.shape[1]

    def tile(v):
        return v[..., None, None].expand(-1, -1, *q.shape[-2:])

    other = p[other_class_index(classes)]
    conv = model.dense_compare[0]
    from_q = _conv_part(conv, q, slice(0, c))
    from_p = _conv_part(conv, tile(p), slice(c, 2 * c))
    from_other = _conv_part(conv, tile(other), slice(c, 2 * c))
    bias = conv.bias[None, :, None, None]
    pre = from_q + from_p + bias
    own, zeroed, swapped = F.relu(pre), F.relu(from_q + bias), F.relu(from_q + from_other + bias)
    total_var = float(pre.var(dim=(0, 2, 3)).sum())

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp_min(1e-12))

    return {
        "concat": {
            "query_norm_per_location": float(q.norm(dim=1).mean()),
            "prototype_norm": float(p.norm(dim=1).mean()),
            "prototype_change_other_class": float((p - other).norm(dim=1).mean() / p.norm(dim=1).mean()),
            "query_channels_dead_fraction": float((q <= 0).float().mean()),
        },
        "dense_compare": {
            "weight_norm_query_channels": float(conv.weight[:, :c].norm()),
            "weight_norm_prototype_channels": float(conv.weight[:, c:].norm()),
            "dead_fraction": float((pre <= 0).float().mean()),
            "dead_channels_fraction": float((pre <= 0).transpose(0, 1).flatten(1).all(dim=1).float().mean()),
            "variance_share_query": float(from_q.var(dim=(0, 2, 3)).sum()) / total_var,
            "variance_share_prototype": float(from_p.var(dim=(0, 2, 3)).sum()) / total_var,
            "prototype_term_norm_over_query_term": float(from_p.norm() / from_q.norm()),
            "output_change_prototype_zeroed": rel(zeroed, own),
            "output_change_other_class_prototype": rel(swapped, own),
        },
        "decoder": decoder_changes(model, own, swapped),
    }


@torch.no_grad()
def decoder_changes(model, own: torch.Tensor, swapped: torch.Tensor) -> dict:
    """How much of the comparison's change (another class's prototype) survives the decoder:
    relative change after the IOM blocks (zero history), of the logits after the test-time
    iterations, and the fraction of feature locations whose argmax flips."""
    def trunk(x):
        out = model.iom_blocks[0](x, x.new_zeros(x.shape[0], 2, *x.shape[-2:]))
        for block in model.iom_blocks[1:]:
            out = block(out)
        return out

    a, b = model.iterate(own, model.iom_iterations), model.iterate(swapped, model.iom_iterations)
    ta, tb = trunk(own), trunk(swapped)
    return {"iom_change": float((ta - tb).norm() / ta.norm()),
            "logit_change": float((a - b).norm() / a.norm()),
            "logit_margin_change": float(((a[:, 1] - a[:, 0]) - (b[:, 1] - b[:, 0])).abs().mean()
                                         / (a[:, 1] - a[:, 0]).abs().mean()),
            "flipped_locations": float((a.argmax(1) != b.argmax(1)).float().mean())}


def concat_gradient(model, batch: dict) -> dict:
    """Train mode (dropout on, zero history): |dL/d(prototype channels)| against |dL/d(query channels)|
    at the dense comparison's input."""
    captured = {}

    def hook(module, inputs):
        x = inputs[0]
        x.retain_grad()
        captured["x"] = x

    handle = model.dense_compare.register_forward_pre_hook(hook)
    try:
        model.train()
        torch.manual_seed(0)
        out = model.forward_train(batch)
        out.loss.backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
        model.eval()
    grad = captured["x"].grad
    c = grad.shape[1] // 2
    return {"query_channels": float(grad[:, :c].norm()), "prototype_channels": float(grad[:, c:].norm()),
            "ratio_prototype_over_query": float(grad[:, c:].norm() / grad[:, :c].norm().clamp_min(1e-30))}


@torch.no_grad()
def swap_stats(model, data, protocol, batches: list[dict]) -> dict:
    """(e) own/shifted validation mIoU, pixels whose argmax flips, mean |change| of P(fg)."""
    cpu = torch.device("cpu")
    own = evaluate_model(model, data, protocol, EvalSettings(shot=1, device=cpu, batch_size=50))["miou"]
    shifted = evaluate_model(model, data, protocol, EvalSettings(shot=1, device=cpu, batch_size=50,
                                                                 support_control="shifted"))["miou"]
    shift = ShiftedSupports()
    flips = changes = pixels = 0.0
    model.eval()
    for batch in batches:
        a = model.predict(batch["support_images"], batch["support_masks"], batch["query_images"]).float().softmax(1)
        moved = shift(batch)
        b = model.predict(moved["support_images"], moved["support_masks"], batch["query_images"]).float().softmax(1)
        flips += float((a.argmax(1) != b.argmax(1)).sum())
        changes += float((a[:, 1] - b[:, 1]).abs().sum())
        pixels += a[:, 1].numel()
    return {"miou_own": 100 * own, "miou_shifted": 100 * shifted, "flipped_pixels": flips / pixels,
            "mean_abs_change_p_fg": changes / pixels}


def shortcut_stats(data, protocol, train_data) -> dict:
    """What a support-blind head can reach: validation queries holding a labelled object of
    another class (background in the target), and the mIoU of two oracles, "every labelled
    object is foreground" (the salient-object shortcut) and "exactly the target"; plus the
    training images holding more than one class."""
    meter = IoUMeter(data.novel_classes, ignore_index=255)
    with_other = 0
    specs = protocol.episode_specs(data, 1, run=0)
    for spec in specs:
        label = torch.tensor(data.load(spec.query)[1]).long()
        target = spec.class_ids[0]
        binary = torch.where(label == 255, 255, (label == target).long())
        objects = ((label > 0) & (label != 255)).long()
        with_other += bool(((label > 0) & (label != 255) & (label != target)).any())
        meter.update_batch(objects[None], binary[None], torch.tensor([target]))
    several = sum(len(set(torch.tensor(train_data.load(i)[1]).unique().tolist()) - {0, 255}) > 1
                  for i in range(len(train_data)))
    return {"queries_with_another_class": with_other / len(specs),
            "oracle_all_objects_miou": 100 * meter.compute()["miou"],
            "train_images_with_several_classes": several / len(train_data)}


def canet_report(model, batches: list[dict]) -> dict:
    batch = cat_batches(batches)
    feat = canet_features(model, batch)
    out = {"separation": separation(feat, batch["class_ids"])}
    out.update(dense_compare_stats(model, feat, batch["class_ids"]))
    out["gradient"] = concat_gradient(model, batch)
    return out


def diagnose_fold(args, fold: int) -> dict:
    result = {}
    for method in args.methods:
        run = args.runs / method / f"fold{fold}"
        if not (run / "model.pt").is_file():
            print(f"  {run}/model.pt missing: skipped")
            continue
        model, config = load_run(args.runs, method, fold)
        data, protocol = validation_data(config, args.clone, args.episodes)
        batches = batches_of(data, protocol)
        entry = {"swap": swap_stats(model, data, protocol, batches)}
        if args.shortcut and "shortcut" not in result:
            train_data = open_prepared(args.clone / "data" / config.dataset, fold, "train", dataset=config.dataset)
            result["shortcut"] = shortcut_stats(data, protocol, train_data)
            print(f"  fold {fold} shortcut: {json.dumps(result['shortcut'])}", flush=True)
        if method in CANET_FAMILY:
            entry["trained"] = canet_report(model, batches)
            entry["untrained"] = canet_report(untrained_like(config, args.clone), batches)
        result[method] = entry
        print(f"  fold {fold} {method}: {json.dumps(entry['swap'])}", flush=True)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clone", type=Path, required=True, help="clone of the project (data/, pretrained/)")
    parser.add_argument("--runs", type=Path, default=None, help="runs folder (default CLONE/runs)")
    parser.add_argument("--methods", nargs="+", default=["prototype", "apanet", "canet", "celp", "dpnet_canet",
                                                          "dpnet_pfenet", "panet", "pfenet", "simpropnet"])
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--shortcut", action="store_true",
                        help="also the oracles' numbers (queries with another class; 30 s a fold)")
    parser.add_argument("--out", type=Path, default=None, help="JSON of every number")
    args = parser.parse_args(argv)
    args.runs = args.runs or args.clone / "runs"
    report = {"clone": str(args.clone), "runs": str(args.runs), "episodes": args.episodes,
              "folds": {str(f): diagnose_fold(args, f) for f in args.folds}}
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
