"""PANet (Wang et al., ICCV 2019): prototype alignment network, and its checkpoint importer.

Follows the reference code (``kaixin96/PANet``, ``models/fewshot.py``):

* one backbone for supports and query, trained end to end (VGG16 in the paper: output
  stride 8, no ReLU after the last conv of conv5);
* prototypes (Eq. 1-2): features are upsampled bilinearly (align_corners=False, the
  reference's ``F.interpolate`` default) to the mask size, then masked average pooling
  with eps 1e-5 (computed without materialising the upsampled map, same sum:
  :func:`fss.models.blocks.upsampled_masked_average_pool`); one foreground prototype per way (mean over shots), ONE background
  prototype = mean over ways and shots of the MAP of each support's non-episode-class
  pixels;
* logits (Eq. 3) = ``alpha`` * cosine(query feature, prototype), stacked
  ``[bg, fg_1..fg_N]`` at feature resolution, upsampled bilinearly (align_corners=False)
  to the image size; L_seg = CE with ignore 255 (Eq. 5);
* PAR (Section 3.5, Eq. 6-7), training only: see :meth:`PANet.alignment_loss`.
  L = L_seg + lambda_par * L_PAR.
* ``bn_eval`` (default False): a backbone with BatchNorm (the synthetic benchmark's small
  one; the paper's VGG16 has none) keeps its running statistics while it is fine-tuned.

**Support mask values.** Foreground is ``mask == 1``. The reference's background mask is
``label != every episode class``, which includes the 255 pixels: support 255 pixels count
as background (for the prototype and as label 0 in PAR), while the query label keeps 255
as ignore. In N-way episodes the reference also removes the pixels of the *other* episode
classes from a support's background; our per-way binary masks mark those 0 (background)
unless the data layer writes :data:`OTHER_EPISODE_CLASS` (2) there, which this model
then excludes from the background prototype and labels 255 in PAR, as the reference does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from fss.errors import CheckpointError, ConfigError
from fss.models.backbones import STAGES, build_backbone, chosen_stages, stage_outputs
from fss.models.backbones.vgg import panet_key_to_backbone_key
from fss.models.base import FSSModel, ModelOutput
from fss.models.blocks import upsampled_masked_average_pool
from fss.models.checkpoints import import_report, load_strict, register_importer, safe_torch_load
from fss.models.registry import Knob, create_model, register_method

PANET_MAP_EPS = 1e-5
IGNORE_INDEX = 255
#: Optional support-mask value for pixels of another class of the same N-way episode.
OTHER_EPISODE_CLASS = 2

PANET_BACKBONES = ("vgg16", "small", "resnet50", "resnet101", "resnet50v2", "resnet101v2")

PANET_KNOBS = {
    "par": Knob(True, bool, table="PANet Table 5",
                help="prototype alignment regularisation (training only); default on"),
    "lambda_par": Knob(1.0, float, low=0.0, high=100.0,
                       help="weight of the PAR loss: L = L_seg + lambda_par * L_PAR; default 1.0"),
    "alpha": Knob(20.0, float, low=0.01, high=1000.0,
                  help="cosine-similarity scale of the logits (Eq. 3); default 20"),
    "ways": Knob(1, int, low=1, high=5, table="PANet Table 3",
                 help="classes per episode N (inputs [B,N,K,...], logits [B,N+1,H,W]); default 1"),
    "bn_eval": Knob(False, bool,
                    help="keep the backbone's BatchNorm layers in eval mode (running statistics, not "
                         "updated) while fine-tuning; default False = train mode (the paper's VGG16 has "
                         "no BatchNorm; the synthetic benchmark's small backbone has)"),
    "layers": Knob(["layer4"], list, choices=STAGES, item_kind=str,
                   help="backbone stages whose features are matched, each resized bilinearly to the "
                        "deepest one's size and concatenated; default layer4 = the reference's encoder output"),
}


def _upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with the reference's ``align_corners=False``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def prototype_logits(feat: torch.Tensor, prototypes: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * cos(feat, p_j)`` for every prototype (Eq. 3 of PANet, before the softmax).

    ``feat`` ``[B, C, h, w]``, ``prototypes`` ``[B, P, C]`` -> ``[B, P, h, w]``; uses
    :func:`torch.nn.functional.cosine_similarity` (eps 1e-8) like the reference.
    """
    return F.cosine_similarity(feat.unsqueeze(1), prototypes[..., None, None], dim=2) * alpha


def background_mask(support_masks: torch.Tensor) -> torch.Tensor:
    """Support background: every pixel that is neither this way's class nor another episode class.

    255 counts as background (the reference's ``bg_mask = label != class ids``).
    """
    return (support_masks != 1) & (support_masks != OTHER_EPISODE_CLASS)


def par_support_label(support_masks: torch.Tensor) -> torch.Tensor:
    """PAR target for a support (Section 3.5): 1 on its foreground, 0 on its background, 255 elsewhere."""
    label = torch.full_like(support_masks, IGNORE_INDEX, dtype=torch.long)
    label[background_mask(support_masks)] = 0
    label[support_masks == 1] = 1
    return label


def _as_n_way(support_images: torch.Tensor, support_masks: torch.Tensor, ways: int):
    """Inputs as ``[B,N,K,3,H,W]`` / ``[B,N,K,H,W]`` (1-way ``[B,K,...]`` gets N = 1)."""
    if support_images.dim() == 5 and support_masks.dim() == 4:
        support_images, support_masks = support_images.unsqueeze(1), support_masks.unsqueeze(1)
    if support_images.dim() != 6 or support_masks.dim() != 5:
        raise ConfigError(
            f"panet expects support_images [B,N,K,3,H,W] (or [B,K,3,H,W] for 1 way) and matching "
            f"support_masks, got {tuple(support_images.shape)} and {tuple(support_masks.shape)}."
        )
    if support_images.shape[1] != ways:
        raise ConfigError(
            f"panet was built with ways={ways} but the episode has {support_images.shape[1]} ways; "
            f"set the knob 'ways' to {support_images.shape[1]}."
        )
    return support_images, support_masks


@register_method("panet", base=None, knobs=PANET_KNOBS, backbones=PANET_BACKBONES, display="PANet")
class PANet(FSSModel):
    """PANet: cosine matching against masked-average prototypes, with prototype alignment (PAR)."""

    def __init__(
        self,
        backbone: str = "vgg16",
        shot: int = 1,
        backbone_weights: str | None = None,
        *,
        par: bool,
        lambda_par: float,
        alpha: float,
        ways: int,
        bn_eval: bool,
        layers: list,
        fg_weight: float,
    ) -> None:
        super().__init__(fg_weight=fg_weight)
        self.layers = chosen_stages("panet", layers)
        self.shot = shot
        self.bn_eval = bn_eval
        self.par = par
        self.lambda_par = lambda_par
        self.alpha = alpha
        self.ways = ways
        self.backbone = build_backbone(backbone, weights=backbone_weights)  # trained end to end
        self.train(True)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.bn_eval:  # BatchNorm keeps the pretrained running statistics
            for module in self.backbone.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    # ----------------------------------------------------------------- building blocks
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[N, C, h, w]`` of the ``layers`` stages (default: the last stage's output)."""
        def stages(rows):
            return stage_outputs(self.backbone, images[rows], self.layers)

        # frozen_features: the evaluation feature cache hook (base.py); a plain call in training
        feats = self.frozen_features("panet.encode:" + ",".join(self.layers), stages, images)
        if len(feats) == 1:
            return feats[0]
        size = feats[-1].shape[-2:]
        return torch.cat([_upsample(f, size) for f in feats], dim=1)

    def encode_episode(self, support_images: torch.Tensor, query_images: torch.Tensor):
        """One backbone call for supports ``[B,N,K,3,H,W]`` and queries ``[B,3,H,W]``."""
        b, n, k = support_images.shape[:3]
        feats = self.encode(torch.cat([support_images.flatten(0, 2), query_images], dim=0))
        support_feats = feats[: b * n * k].view(b, n, k, *feats.shape[1:])
        return feats[b * n * k :], support_feats

    def support_prototypes(self, support_feats: torch.Tensor, support_masks: torch.Tensor):
        """Eq. 1-2: foreground prototypes ``[B,N,C]`` and the background prototype ``[B,C]``.

        As in the reference, MAP (eps 1e-5) pools the features bilinearly upsampled
        (``align_corners=False``) to the mask size; :func:`upsampled_masked_average_pool`
        computes exactly that sum with the transposed resize applied to the mask instead.
        """
        b, n, k = support_feats.shape[:3]
        feats = support_feats.flatten(0, 2)
        masks = support_masks.flatten(0, 2)
        fg = upsampled_masked_average_pool(feats, (masks == 1).unsqueeze(1), PANET_MAP_EPS).view(b, n, k, -1)
        bg = upsampled_masked_average_pool(feats, background_mask(masks).unsqueeze(1), PANET_MAP_EPS).view(b, n, k, -1)
        return fg.mean(dim=2), bg.mean(dim=(1, 2))

    def query_logits(self, query_feat: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        """Feature-resolution logits ``[B, N+1, h, w]`` against ``[bg, fg_1..fg_N]``."""
        return prototype_logits(query_feat, torch.cat([bg.unsqueeze(1), fg], dim=1), self.alpha)

    def alignment_loss(self, query_feat, query_logits, support_feats, support_masks) -> torch.Tensor:
        """L_PAR (Section 3.5, Eq. 6-7), as the reference's ``alignLoss``.

        The argmax of the feature-resolution query logits gives one binary mask per class;
        query prototypes = MAP of the query feature at feature resolution (eps 1e-5, not
        detached). For every way whose predicted foreground is non-empty, each of its
        supports is segmented with [query bg prototype, query fg prototype of the way]
        (alpha * cosine, upsampled to the mask size) against :func:`par_support_label`;
        CE (ignore 255, mean over the support's pixels) divided by shots * ways, summed,
        then averaged over the episodes of the batch.
        """
        b, n, k = support_feats.shape[:3]
        classes = query_logits.shape[1]
        pred = query_logits.argmax(dim=1)
        onehot = F.one_hot(pred, classes).permute(0, 3, 1, 2).to(query_feat.dtype)  # [B,N+1,h,w]
        area = onehot.sum(dim=(2, 3))  # [B,N+1]
        query_protos = torch.einsum("bchw,bphw->bpc", query_feat, onehot) / (area.unsqueeze(-1) + PANET_MAP_EPS)
        present = area[:, 1:] > 0  # [B,N]: ways with a predicted foreground
        way_protos = torch.stack(
            [query_protos[:, :1].expand(-1, n, -1), query_protos[:, 1:]], dim=2
        )  # [B,N,2,C]: [bg, fg_way]
        feats = support_feats.flatten(0, 2)  # [BNK,C,h,w]
        protos = way_protos.unsqueeze(2).expand(-1, -1, k, -1, -1).flatten(0, 2)  # [BNK,2,C]
        support_logits = _upsample(prototype_logits(feats, protos, self.alpha), support_masks.shape[-2:])
        labels = par_support_label(support_masks.flatten(0, 2))
        pixel_loss = F.cross_entropy(support_logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
        valid = (labels != IGNORE_INDEX).sum(dim=(1, 2))
        per_support = pixel_loss.sum(dim=(1, 2)) / valid.clamp_min(1)  # CE mean per support image
        per_support = per_support.view(b, n, k) * present.unsqueeze(-1).to(per_support.dtype)
        return per_support.sum(dim=(1, 2)).div(n * k).mean()

    # ----------------------------------------------------------------- forward passes
    def forward_train(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        support_images, support_masks = _as_n_way(batch["support_images"], batch["support_masks"], self.ways)
        query_images, query_masks = batch["query_images"], batch["query_masks"]
        query_feat, support_feats = self.encode_episode(support_images, query_images)
        fg, bg = self.support_prototypes(support_feats, support_masks)
        low_logits = self.query_logits(query_feat, fg, bg)
        logits = _upsample(low_logits, query_images.shape[-2:])
        seg = self.segmentation_ce(logits, query_masks)  # train.fg_weight on every way's foreground
        losses = {"seg": seg}
        total = seg
        if self.par:
            par = self.alignment_loss(query_feat, low_logits, support_feats, support_masks)
            losses["par"] = par
            total = seg + self.lambda_par * par
        losses["loss"] = total
        return ModelOutput(logits=logits, losses=losses)

    def forward_infer(self, support_images, support_masks, query_images) -> torch.Tensor:
        support_images, support_masks = _as_n_way(support_images, support_masks, self.ways)
        query_feat, support_feats = self.encode_episode(support_images, query_images)
        fg, bg = self.support_prototypes(support_feats, support_masks)
        return _upsample(self.query_logits(query_feat, fg, bg), query_images.shape[-2:])


# --------------------------------------------------------------------------- importer
PANET_KEY = re.compile(r"^encoder\.backbone\.features\.(\d+)\.(\d+)\.(weight|bias)$")


def _guess_format(blob) -> str:
    """A short name for what a non-PANet checkpoint looks like (for the error message)."""
    if isinstance(blob, dict) and blob.get("format") == "fss-model":
        return "a model file of this project (load it directly, no import needed)"
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        keys = list(blob["state_dict"])
        if any("down_feat" in key for key in keys):
            return "a CELP checkpoint (use --format celp)"
        if any("down_query" in key or "init_merge" in key for key in keys):
            return "a PFENet checkpoint (use --format pfenet)"
        return "a training checkpoint with a 'state_dict' entry, not PANet's plain state dict"
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        return "something other than a state dict"
    keys = [key[7:] if key.startswith("module.") else key for key in blob]
    if any(key.startswith("bn1.") or key.startswith("layer1.") for key in keys):
        if any(key.startswith("conv2.") for key in keys):
            return "a v2 deep-stem ResNet backbone file (pass it as backbone weights instead)"
        return "a torchvision ResNet backbone file (pass it as backbone weights instead)"
    if any(key.startswith("features.") for key in keys):
        return "a torchvision VGG backbone file (pass it as backbone weights instead)"
    return "an unknown state dict"


def panet_model_state(panet_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a released PANet state dict's keys to this project's :class:`PANet` keys.

    ``module.encoder.backbone.features.{block}.{index}.*`` -> ``backbone.features.{block}.{index}.*``
    (the ``vgg16`` backbone keeps PANet's module tree, see ``backbones/vgg.py``).
    """
    out = {}
    for key, value in panet_state.items():
        mapped = panet_key_to_backbone_key(key)
        if mapped is None:
            raise CheckpointError(f"unexpected key {key!r} in a PANet checkpoint; PANet has only encoder weights.")
        out[f"backbone.{mapped}"] = value
    return out


@register_importer("panet")
def import_panet_checkpoint(path, dataset: str | None = None, shot: int = 1, **knobs):
    """Load a released PANet model (plain state dict, keys ``module.encoder.backbone.features.*``).

    Returns ``(model, report)``; refuses files of other formats with a one-line
    :class:`CheckpointError`. The model gets the ``vgg16`` backbone; ``knobs`` are PANet
    knobs (e.g. ``ways=2``; evaluation chooses ``ways`` again, no weight depends on it).
    ``dataset`` is only recorded: PANet has no dataset-dependent setting.
    """
    blob = safe_torch_load(path)
    if isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        stripped = {(k[7:] if k.startswith("module.") else k): v for k, v in blob.items()}
        if all(PANET_KEY.match(k) for k in stripped):
            model = create_model("panet", backbone="vgg16", shot=shot, **knobs)
            counts = load_strict(model, panet_model_state(blob), str(path))
            return model, import_report(
                fmt="panet", method="panet", backbone="vgg16", dataset=dataset, knobs=knobs,
                matched=counts["matched"], file_keys=len(stripped), epoch=None, path=path,
            )
    raise CheckpointError(
        f"{path} looks like {_guess_format(blob)}, not a PANet checkpoint (a plain state dict of "
        f"'module.encoder.backbone.features.*' tensors)."
    )
