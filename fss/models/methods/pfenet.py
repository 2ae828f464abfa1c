"""PFENet (Tian et al., "Prior Guided Feature Enrichment Network", TPAMI 2020).

The baseline of APANet, CELP and DPNet(PFENet). Follows the reference code
(dvlab-research/PFENet ``model/PFENet.py``) step by step:

1. frozen backbone under ``no_grad``; mid-level feature = concat(block 3, block 2) (block 2
   resized to block 3's size when they differ, as for VGG16-BN);
2. 1x1 conv to ``reduce_dim`` + ReLU + Dropout2d(0.5), separate weights for the query
   (``down_query``) and the supports (``down_supp``);
3. prototype = masked average pooling (eps 5e-4) of the reduced support feature with the
   support mask resized to block 3's size; the support's block-4 feature is computed from
   block 3 multiplied by that mask;
4. prior mask from block-4 features (:func:`fss.models.blocks.prior_mask`); K shots: the
   prototypes and the priors are averaged (protocol section 7);
5. feature enrichment module + decoder (:meth:`PFENet.fem_decode`), logits upsampled
   bilinearly (align_corners=True) to the query size; loss = CE(main) + aux_weight * mean
   over bins of CE(aux), ignore 255.

Module names equal the reference's (``down_query``, ``down_supp``, ``init_merge``,
``alpha_conv``, ``beta_conv``, ``inner_cls``, ``res1``, ``res2``, ``cls``); the backbone
lives under ``backbone.layer0..layer4``, so importing a released checkpoint is a prefix
mapping (:func:`import_pfenet`).

Reusable pieces for methods built on PFENet: :meth:`PFENet.extract_features` (reduced
query/support features, block-4 features, prototypes, priors) and
:meth:`PFENet.fem_decode` (the comparison module g_phi, callable with any prototype and
prior: APANet Eq. 7-8, CELP Eq. 10).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fss.errors import CheckpointError, ConfigError
from fss.models.backbones import build_backbone
from fss.models.base import FSSModel, ModelOutput
from fss.models.blocks import (
    PFENET_MAP_EPS,
    cross_entropy_ignore,
    masked_average_pool,
    prior_mask,
    resize_bilinear,
)
from fss.models.checkpoints import import_report, load_strict, register_importer, safe_torch_load
from fss.models.registry import Knob, create_model, register_method

#: pyramid bins of the reference configs: absolute sides for PASCAL (473 input, 60x60
#: features) and fractions of the feature side for COCO.
PASCAL_BINS = [60, 30, 15, 8]
COCO_BINS = [1.0, 0.5, 0.25, 0.125]

PFENET_BACKBONES = ("small", "resnet50v2", "resnet101v2", "vgg16bn", "resnet50", "resnet101")

PFENET_KNOBS = {
    "pyramid_bins": Knob(
        list(PASCAL_BINS), list,
        "FEM pyramid bins: a value > 1 is an absolute side (PASCAL preset 60,30,15,8 for 473 "
        "inputs), a value <= 1 a fraction of the feature side (COCO preset 1.0,0.5,0.25,0.125)",
        low=1e-3, high=512, item_kind=float, small=[6, 3, 1.0],
    ),
    "aux_weight": Knob(1.0, float, "weight of the mean per-bin auxiliary CE loss (reference 1.0)", low=0.0, high=100.0),
    "reduce_dim": Knob(256, int, "channels of the reduced mid-level features (reference 256)", low=4, high=2048,
                       small=16),
    "feature_dropout": Knob(
        0.5, float,
        "Dropout2d probability after the query and support reductions (reference 0.5; in "
        "training each side loses its own random half of the channels they are compared on)",
        low=0.0, high=0.9,
    ),
    "backbone_bn_train": Knob(
        False, bool,
        "compatibility: keep the frozen backbone's BatchNorm in train mode like the PFENet "
        "reference (default off: eval mode, as CELP and later codebases)",
    ),
}


def parse_pyramid_bins(bins, where: str = "pyramid_bins") -> tuple[float | int, ...]:
    """Validate pyramid bins: integers > 1 are sides, values in (0, 1] fractions."""
    if isinstance(bins, str) and bins.lower() in ("pascal", "coco"):
        bins = PASCAL_BINS if bins.lower() == "pascal" else COCO_BINS
    out = []
    for b in bins:
        b = float(b)
        if b <= 0 or (b > 1 and not b.is_integer()):
            raise ConfigError(
                f"{where} got {list(bins)!r}; every bin must be an integer side > 1 or a fraction in (0, 1]."
            )
        out.append(int(b) if b > 1 else b)
    if not out:
        raise ConfigError(f"{where} is empty; give at least one bin, e.g. {PASCAL_BINS}.")
    return tuple(out)


def bin_side(bin_spec: float | int, feature_side: int) -> int:
    """Side of a pyramid bin: absolute, or ``int(side * fraction)`` (reference; at least 1)."""
    if bin_spec > 1:
        return int(bin_spec)
    return max(1, int(feature_side * bin_spec))


def _conv_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.ReLU(inplace=True)]


def _reduction(cin: int, cout: int, dropout: float) -> nn.Sequential:
    """1x1 conv + ReLU + Dropout2d (reference 0.5): PFENet's down_query / down_supp."""
    return nn.Sequential(*_conv_relu(cin, cout, 1), nn.Dropout2d(p=dropout))


def _classifier(dim: int, classes: int = 2) -> nn.Sequential:
    """3x3 conv + ReLU + Dropout2d(0.1) + 1x1 conv (with bias): ``cls`` and ``inner_cls``."""
    return nn.Sequential(*_conv_relu(dim, dim, 3), nn.Dropout2d(p=0.1), nn.Conv2d(dim, classes, 1))


@dataclass
class PFENetFeatures:
    """The PFENet front end of one batch of episodes (feature size h x w = block 3's)."""

    query: torch.Tensor  # F_q: reduced mid-level query feature [B, D, h, w]
    query_high: torch.Tensor  # F_bar_q: block-4 query feature [B, C4, h4, w4]
    supports: torch.Tensor  # reduced mid-level support features [B, K, D, h, w]
    support_masks: torch.Tensor  # support foreground at block-3 size (bilinear) [B, K, 1, h, w]
    support_high: torch.Tensor  # block-4 features of the masked supports [B, K, C4, h4, w4]
    prototypes: torch.Tensor  # per-shot prototypes [B, K, D]
    priors: torch.Tensor  # per-shot prior masks at feature size [B, K, 1, h, w]

    @property
    def prototype(self) -> torch.Tensor:
        """K-shot prototype: mean of the per-shot prototypes ``[B, D]``."""
        return self.prototypes.mean(dim=1)

    @property
    def prior(self) -> torch.Tensor:
        """K-shot prior: mean of the per-shot priors ``[B, 1, h, w]``."""
        return self.priors.mean(dim=1)


@register_method("pfenet", base=None, knobs=PFENET_KNOBS, backbones=PFENET_BACKBONES, display="PFENet")
class PFENet(FSSModel):
    """PFENet: prior mask + feature enrichment module (baseline of APANet, CELP, DPNet)."""

    def __init__(
        self,
        backbone: str = "small",
        shot: int = 1,
        backbone_weights: str | None = None,
        *,
        pyramid_bins,
        aux_weight: float,
        reduce_dim: int,
        feature_dropout: float,
        backbone_bn_train: bool,
        fg_weight: float,
    ) -> None:
        super().__init__(fg_weight=fg_weight)
        self.backbone_name = backbone
        self.shot = shot
        self.pyramid_bins = parse_pyramid_bins(pyramid_bins)
        self.aux_weight = aux_weight
        self.reduce_dim = reduce_dim
        self.feature_dropout = feature_dropout
        self.backbone_bn_train = backbone_bn_train

        self.backbone = build_backbone(backbone, weights=backbone_weights)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        channels = self.backbone.stage_channels
        self._build_reduction(channels["layer3"] + channels["layer2"], reduce_dim)

        bins = len(self.pyramid_bins)
        self.init_merge = nn.ModuleList(nn.Sequential(*_conv_relu(2 * reduce_dim + 1, reduce_dim, 1)) for _ in range(bins))
        self.alpha_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * reduce_dim, reduce_dim, 1, bias=False), nn.ReLU()) for _ in range(bins - 1)
        )
        self.beta_conv = nn.ModuleList(
            nn.Sequential(*_conv_relu(reduce_dim, reduce_dim, 3), *_conv_relu(reduce_dim, reduce_dim, 3))
            for _ in range(bins)
        )
        self.inner_cls = nn.ModuleList(_classifier(reduce_dim) for _ in range(bins))
        self.res1 = nn.Sequential(*_conv_relu(bins * reduce_dim, reduce_dim, 1))
        self.res2 = nn.Sequential(*_conv_relu(reduce_dim, reduce_dim, 3), *_conv_relu(reduce_dim, reduce_dim, 3))
        self.cls = _classifier(reduce_dim)
        self.train(self.training)

    # -- mid-level feature reduction (CELP overrides with one shared ``down_feat``) ------
    def _build_reduction(self, in_channels: int, reduce_dim: int) -> None:
        self.down_query = _reduction(in_channels, reduce_dim, self.feature_dropout)
        self.down_supp = _reduction(in_channels, reduce_dim, self.feature_dropout)

    def reduce_query(self, mid: torch.Tensor) -> torch.Tensor:
        return self.down_query(mid)

    def reduce_support(self, mid: torch.Tensor) -> torch.Tensor:
        return self.down_supp(mid)

    # -- frozen backbone ---------------------------------------------------------------
    def train(self, mode: bool = True):
        """Train mode for the new layers; the frozen backbone stays in eval mode unless
        ``backbone_bn_train`` (the reference's train-mode BN)."""
        super().train(mode)
        if not self.backbone_bn_train:
            self.backbone.eval()
        return self

    def _backbone_mid_high(self, images: torch.Tensor, fg: torch.Tensor | None = None):
        """(block 2 resized to block 3, block 3, block 4, fg mask at block 3) without gradients.

        With ``fg`` (support foreground at image size), block 4 is computed from block 3
        multiplied by the mask resized to block 3's size, as in the reference.
        """
        bb = self.backbone

        def mid(rows):
            f2 = bb.layer2(bb.layer1(bb.layer0(images[rows])))
            return f2, bb.layer3(f2)

        def high(rows):
            return (bb.layer4(f3[rows] if mask is None else f3[rows] * mask[rows]),)

        with torch.no_grad():  # frozen_features: the evaluation feature cache hook (base.py)
            f2, f3 = self.frozen_features("pfenet.mid", mid, images)
            mask = None if fg is None else resize_bilinear(fg, f3.shape[-2:])
            (f4,) = self.frozen_features("pfenet.high", high, images, mask)
            f2 = resize_bilinear(f2, f3.shape[-2:])
        return f2, f3, f4, mask

    def _support_backbone(self, images: torch.Tensor, fg: torch.Tensor):
        """Backbone pass of ``[B, K, 3, H, W]`` supports: all shots at once in eval mode, one
        shot per pass (the reference's batch statistics) when the backbone BN trains."""
        batch, shots = images.shape[:2]
        if self.backbone_bn_train and self.backbone.training:
            per_shot = [self._backbone_mid_high(images[:, k], fg[:, k]) for k in range(shots)]
            return [torch.stack(parts, dim=1) for parts in zip(*per_shot)]
        outs = self._backbone_mid_high(images.flatten(0, 1), fg.flatten(0, 1))
        return [t.unflatten(0, (batch, shots)) for t in outs]

    # -- Eq. 1 of APANet / PFENet front end ----------------------------------------------
    def extract_features(
        self, support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor
    ) -> PFENetFeatures:
        """Reduced query/support features, block-4 features, per-shot prototypes and priors."""
        batch, shots = support_masks.shape[:2]
        q2, q3, q4, _ = self._backbone_mid_high(query_images)
        query = self.reduce_query(torch.cat([q3, q2], dim=1))

        fg = (support_masks == 1).to(query_images.dtype).unsqueeze(2)  # B, K, 1, H, W
        s2, s3, s4, s_mask = self._support_backbone(support_images, fg)
        supports = self.reduce_support(torch.cat([s3, s2], dim=2).flatten(0, 1))
        prototypes = masked_average_pool(supports, s_mask.flatten(0, 1), PFENET_MAP_EPS)

        mask4 = resize_bilinear(fg.flatten(0, 1), s4.shape[-2:])
        priors = prior_mask(q4.repeat_interleave(shots, dim=0), s4.flatten(0, 1) * mask4)
        priors = resize_bilinear(priors, query.shape[-2:]).to(query.dtype)
        return PFENetFeatures(
            query=query,
            query_high=q4,
            supports=supports.unflatten(0, (batch, shots)),
            support_masks=s_mask,
            support_high=s4,
            prototypes=prototypes.unflatten(0, (batch, shots)),
            priors=priors.unflatten(0, (batch, shots)),
        )

    # -- g_phi: feature enrichment module + decoder --------------------------------------
    def fem_decode(
        self, query: torch.Tensor, prototype: torch.Tensor, prior: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """PFENet's FEM and decoder on ``concat(query, prototype, prior)``.

        ``query [B, D, h, w]``; ``prototype [B, D]`` (tiled, PFENet) or ``[B, D, h, w]`` (a
        prototype per location, APANet's E_q; pooled like the query at each bin);
        ``prior [B, 1, h, w]``. Returns feature-resolution logits ``[B, 2, h, w]`` and the
        per-bin auxiliary logits (``[B, 2, bin, bin]`` each).
        """
        ((logits, aux),) = self.fem_decode_many(query, [(prototype, prior)])
        return logits, aux

    def fem_decode_many(
        self, query: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """:meth:`fem_decode` of the same query features with several ``(prototype, prior)``
        pairs (APANet's and CELP's second, training-only pass through g_phi), run as one
        batch of ``len(pairs) * B`` after the per-pair 1x1 merge: the same function, with
        fewer and larger convolutions. Returns one ``(logits, aux)`` per pair.
        """
        h, w = query.shape[-2:]
        count = len(pairs)
        merged: list[torch.Tensor] = []
        aux: list[torch.Tensor] = []
        for idx, spec in enumerate(self.pyramid_bins):
            side = bin_side(spec, h)
            query_bin = F.adaptive_avg_pool2d(query, side)
            inputs = []
            for prototype, prior in pairs:
                if prototype.dim() == 2:
                    proto_bin = prototype[..., None, None].expand(-1, -1, side, side)
                else:
                    proto_bin = F.adaptive_avg_pool2d(prototype, side)
                prior_bin = resize_bilinear(prior.to(query.dtype), (side, side))
                inputs.append(torch.cat([query_bin, proto_bin.to(query.dtype), prior_bin], 1))
            x = self.init_merge[idx](inputs[0] if count == 1 else torch.cat(inputs, 0))
            if idx > 0:
                previous = resize_bilinear(merged[-1], (side, side))
                x = self.alpha_conv[idx - 1](torch.cat([x, previous], dim=1)) + x
            x = self.beta_conv[idx](x) + x
            aux.append(self.inner_cls[idx](x))
            merged.append(resize_bilinear(x, (h, w)))
        x = self.res1(torch.cat(merged, dim=1))
        x = self.res2(x) + x
        logits = self.cls(x)
        if count == 1:
            return [(logits, aux)]
        per_pair_aux = [a.chunk(count, 0) for a in aux]
        return [(part, [a[i] for a in per_pair_aux]) for i, part in enumerate(logits.chunk(count, 0))]

    # -- losses and the two forwards -------------------------------------------------------
    def segmentation_losses(
        self, logits: torch.Tensor, aux: list[torch.Tensor], target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``main`` = CE of the upsampled logits; ``aux`` = mean over bins of the CE of the
        upsampled auxiliary logits (ignore 255)."""
        size = target.shape[-2:]
        w = self.fg_weight  # train.fg_weight (1 = the reference's plain CE)
        aux_terms = [cross_entropy_ignore(resize_bilinear(a, size), target, fg_weight=w) for a in aux]
        return {"main": cross_entropy_ignore(logits, target, fg_weight=w), "aux": torch.stack(aux_terms).mean()}

    def forward_train(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        query_images = batch["query_images"]
        feats = self.extract_features(batch["support_images"], batch["support_masks"], query_images)
        low, aux = self.fem_decode(feats.query, feats.prototype, feats.prior)
        logits = resize_bilinear(low, query_images.shape[-2:])
        losses = self.segmentation_losses(logits, aux, batch["query_masks"])
        losses["loss"] = losses["main"] + self.aux_weight * losses["aux"]
        return ModelOutput(logits=logits, losses=losses)

    def forward_infer(self, support_images, support_masks, query_images) -> torch.Tensor:
        feats = self.extract_features(support_images, support_masks, query_images)
        low, _ = self.fem_decode(feats.query, feats.prototype, feats.prior)
        return resize_bilinear(low, query_images.shape[-2:])


# ---------------------------------------------------------------------------
# Importing the reference's released checkpoints (PFENet here, CELP in celp.py)
# ---------------------------------------------------------------------------

def read_reference_checkpoint(path) -> tuple[dict[str, torch.Tensor], int | None]:
    """State dict (``module.`` prefix removed) and epoch of a reference training checkpoint.

    Accepts the reference container ``{'epoch', 'state_dict', 'optimizer'}`` and, for
    convenience, a bare state dict.
    """
    blob = safe_torch_load(path)
    if isinstance(blob, dict) and blob.get("format") == "fss-model":
        raise CheckpointError(
            f"{path} is already a model file of this project ({blob.get('method')}); load it directly instead of importing it."
        )
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        state, epoch = blob["state_dict"], blob.get("epoch")
    elif isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        state, epoch = blob, None
    else:
        what = f"a dict with keys {sorted(blob)[:5]}" if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(
            f"{path} holds {what}, not a PFENet-style checkpoint {{'epoch', 'state_dict', 'optimizer'}}; "
            f"check the file and the --format."
        )
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return state, (int(epoch) if isinstance(epoch, (int, float)) else None)


def describe_checkpoint(state: dict[str, torch.Tensor]) -> str:
    """What a reference state dict looks like, in words (for one-line refusals)."""
    keys = set(state)
    if {"down_query.0.weight", "down_supp.0.weight"} <= keys:
        return "a PFENet checkpoint (format 'pfenet')"
    if "down_feat.0.weight" in keys and any(k.startswith("init_merge.") for k in keys):
        return "a CELP checkpoint on PFENet (format 'celp')"
    if any(k.startswith("encoder.") for k in keys):
        return "a PANet checkpoint (format 'panet')"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "a plain ResNet backbone state dict (not a trained few-shot model)"
    if any(k.startswith("features.") for k in keys):
        return "a plain VGG backbone state dict (not a trained few-shot model)"
    return f"an unknown format (first key {sorted(keys)[0]!r})" if keys else "an empty state dict"


def infer_pfenet_backbone(state: dict[str, torch.Tensor], path) -> str:
    """``resnet50v2`` / ``resnet101v2`` / ``vgg16bn`` from the reference key names and shapes."""
    stem = state.get("layer0.0.weight")
    if "layer1.0.conv1.weight" in state:
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"layer3\.(\d+)\.", k))}
        depth = {6: "resnet50v2", 23: "resnet101v2"}.get(len(blocks))
        if stem is not None and tuple(stem.shape) == (64, 3, 3, 3) and depth:
            return depth
        shape = None if stem is None else tuple(stem.shape)
        raise CheckpointError(
            f"{path} has a ResNet with {len(blocks)} blocks in layer3 and stem conv {shape}; "
            f"only the deep-stem ResNet-50/101 (v2) of the reference are supported."
        )
    if stem is not None and tuple(stem.shape) == (64, 3, 3, 3) and "layer0.1.running_mean" in state:
        return "vgg16bn"
    raise CheckpointError(f"{path}: cannot tell the backbone from its layer0/layer1 keys; is it a PFENet checkpoint?")


def map_reference_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Reference key -> this project's key: ``layerN.*`` -> ``backbone.`` + the backbone's own
    name for that stage key (``layer0.3.weight`` -> ``backbone.conv2.weight`` for the v2
    stem, ``layer1.0.weight`` -> ``backbone.features.7.weight`` for VGG16-BN); the other
    keys are the same in both. ``num_batches_tracked`` buffers absent from older files are
    filled with zeros."""
    to_own = getattr(model.backbone, "stage_key_to_state_key", lambda key: key)
    mapped = {
        (f"backbone.{to_own(key)}" if re.match(r"layer[0-4]\.", key) else key): value for key, value in state.items()
    }
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = torch.zeros_like(value)
    return mapped


def reference_pyramid_bins(path, dataset: str | None, pyramid_bins, stored: int) -> list:
    """The bins of a released PFENet/CELP file: given, or the preset of its dataset (the keys
    cannot tell PASCAL's from COCO's: both have four bins)."""
    if pyramid_bins is None and dataset is None:
        raise ConfigError(
            f"{path}: the dataset it was trained on is needed (--dataset pascal or coco): the keys cannot "
            f"tell PFENet's pyramid bins (PASCAL {PASCAL_BINS}, COCO {COCO_BINS})."
        )
    bins = list(parse_pyramid_bins(pyramid_bins if pyramid_bins is not None else dataset))
    if stored != len(bins):
        raise CheckpointError(
            f"{path} was trained with {stored} pyramid bins but pyramid_bins={bins} has {len(bins)}; "
            f"pass the bins it was trained with (PASCAL {PASCAL_BINS}, COCO {COCO_BINS})."
        )
    return bins


def build_from_reference(
    path, method: str, expected: str, dataset: str | None = None, shot: int = 1, pyramid_bins=None, **knobs
) -> tuple[FSSModel, dict]:
    """Shared body of the PFENet and CELP importers (``module.`` prefixed or unwrapped keys)."""
    state, epoch = read_reference_checkpoint(path)
    looks_like = describe_checkpoint(state)
    if f"format '{expected}'" not in looks_like:
        raise CheckpointError(f"{path} is not a {expected} checkpoint: it looks like {looks_like}.")
    backbone = infer_pfenet_backbone(state, path)
    stored = len({k.split(".")[1] for k in state if k.startswith("init_merge.")})
    bins = reference_pyramid_bins(path, dataset, pyramid_bins, stored)
    model = create_model(method, backbone=backbone, shot=shot, pyramid_bins=bins, **knobs)
    mapped = map_reference_keys(state, model)
    counts = load_strict(model, mapped, str(path))
    return model, import_report(
        fmt=expected, method=method, backbone=backbone, dataset=dataset, knobs={"pyramid_bins": bins, **knobs},
        matched=counts["matched"], file_keys=len(state), epoch=epoch, path=path,
    )


@register_importer("pfenet")
def import_pfenet(path, dataset: str | None = None, shot: int = 1, pyramid_bins=None) -> tuple[FSSModel, dict]:
    """Load a released PFENet checkpoint (``{'epoch', 'state_dict', 'optimizer'}``, keys with
    ``module.``) into :class:`PFENet`. The backbone (resnet50v2 / resnet101v2 / vgg16bn) is
    read off the keys; the pyramid bins cannot be: give the ``dataset`` it was trained on
    (``pascal``/``coco`` presets) or the ``pyramid_bins`` themselves."""
    return build_from_reference(path, "pfenet", "pfenet", dataset=dataset, shot=shot, pyramid_bins=pyramid_bins)
