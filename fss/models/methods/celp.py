"""CELP (contrastive enhancement with latent prototypes), on PFENet.

Follows the reference code (zhaoxiaoyu1995/CELP-Pytorch, ``CELP_PFENet/model/PFENet.py``):

* PFENet with ONE shared 1x1 reduction ``down_feat`` for query and supports (a reference
  code fact; the paper calls it "unified downsampling");
* LPS (training only, Eq. 1-7): :func:`fss.models.blocks.latent_prototype_region` on the
  query's block-4 features with every base-class location of the query excluded (batch
  key ``query_base_masks`` resized bilinearly to the feature size, > 0.25; as in the
  reference, ignore pixels (255) are excluded too); latent prototype v_l = MAP of the
  reduced query feature over the region (eps 5e-4);
* CE (training only, Eq. 8-10): prior H_q' = min-max normalised cosine of v_l with the
  reduced query feature (the whole feature, as the reference's ``compute_similar``; Eq. 8
  writes F_q masked by M_q'), then concat(F_q, tile(v_l), H_q') through the SAME FEM and
  decoder; CE against the pseudo mask M_q' (Eq. 4-6) with ignore 255;
* loss = main + aux_weight * aux + ce_weight * contrast. The reference code uses
  aux_weight 1.0 and ce_weight 0.10 (the defaults); a literal reading of Eq. 13 with the
  paper's alpha = 1.0, beta = 0.1 is ce_weight = 1.0, aux_weight = 0.1. ce_weight = 0 skips
  the branch (no "contrast" term);
* K shots: prototype and prior averaging (``avg``, the paper's choice) or voting
  (``vote-v``, Table 7): K 1-shot passes, a pixel is foreground when at least v of them
  predict it. Voting logits are ``[v - 0.5, votes]`` (bg, fg) so that argmax gives the
  vote; they are counts, not calibrated scores, and are taken at the query size (the
  reference counts after resizing each pass to the label size).

Without ``reference_diagonal_quirk`` a sample whose query has no candidate centre is left
out of the contrast loss (its pseudo mask is all 255); with it, location 0 is always a
candidate, as in the reference.
"""

from __future__ import annotations

import torch

from fss.errors import ConfigError, DataError
from fss.models.base import FSSModel, ModelOutput
from fss.models.blocks import (
    PFENET_MAP_EPS,
    cross_entropy_ignore,
    latent_prototype_region,
    latent_pseudo_mask,
    masked_average_pool,
    prototype_cosine_prior,
    resize_bilinear,
)
from fss.models.checkpoints import register_importer
from fss.models.methods.pfenet import PFENET_BACKBONES, PFENET_KNOBS, PFENet, PFENetFeatures, _reduction, build_from_reference
from fss.models.registry import Knob, register_method

VOTE_MODES = tuple(f"vote-{v}" for v in range(1, 11))

CELP_KNOBS = {
    **PFENET_KNOBS,
    "delta": Knob(0.65, float, "LPS similarity threshold: A > delta marks similar locations", low=0.0, high=1.0, table="Table 5"),
    "sigma": Knob(10, int, "LPS: a candidate centre needs more than sigma similar locations", low=0, high=100000),
    "ce_weight": Knob(
        0.1, float,
        "weight of the contrastive-enhancement CE loss; reference code 0.10 with aux_weight 1.0; "
        "literal Eq. 13 (alpha 1.0 on CE, beta 0.1 on aux) = ce_weight 1.0, aux_weight 0.1",
        low=0.0, high=100.0, table="Table 6",
    ),
    "kshot_mode": Knob(
        "avg", str, "K-shot inference: prototype+prior averaging, or K 1-shot passes voting (fg if >= v votes)",
        choices=("avg",) + VOTE_MODES, table="Table 7", test_time=True,
    ),
    "reference_diagonal_quirk": Knob(
        False, bool,
        "compatibility: the reference zeroes only element (0,0) of the similarity diagonal and makes "
        "location 0 always a candidate (default off: whole diagonal zeroed, no bonus)",
    ),
}


def base_class_locations(base_masks: torch.Tensor, size) -> torch.Tensor:
    """Locations excluded from LPS: bilinear resize of the base-class mask (255 included) > 0.25."""
    return resize_bilinear(base_masks.float()[:, None], size)[:, 0] > 0.25


@register_method("celp", base="pfenet", knobs=CELP_KNOBS, backbones=PFENET_BACKBONES, display="CELP")
class CELP(PFENet):
    """CELP: PFENet (shared reduction) + training-only latent prototype contrastive enhancement."""

    def __init__(
        self,
        *,
        delta: float,
        sigma: int,
        ce_weight: float,
        kshot_mode: str,
        reference_diagonal_quirk: bool,
        **pfenet_knobs,
    ) -> None:
        super().__init__(**pfenet_knobs)
        self.delta = delta
        self.sigma = sigma
        self.ce_weight = ce_weight
        self.kshot_mode = kshot_mode
        self.reference_diagonal_quirk = reference_diagonal_quirk
        #: random source of the LPS centre draw (None: torch's global RNG)
        self.generator: torch.Generator | None = None

    def _build_reduction(self, in_channels: int, reduce_dim: int) -> None:
        self.down_feat = _reduction(in_channels, reduce_dim, self.feature_dropout)

    def reduce_query(self, mid: torch.Tensor) -> torch.Tensor:
        return self.down_feat(mid)

    def reduce_support(self, mid: torch.Tensor) -> torch.Tensor:
        return self.down_feat(mid)

    def forward_train(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        query_images, query_masks = batch["query_images"], batch["query_masks"]
        feats = self.extract_features(batch["support_images"], batch["support_masks"], query_images)
        pairs = [(feats.prototype, feats.prior)]
        if self.ce_weight > 0:
            if "query_base_masks" not in batch:
                raise DataError(
                    "CELP training needs the batch key 'query_base_masks' (1 on every base class in the query); "
                    "use an episode dataset that provides it or set ce_weight=0."
                )
            latent, latent_prior, pseudo = self.contrastive_inputs(feats, batch["query_base_masks"])
            pairs.append((latent, latent_prior))
        # the main branch and CE through the shared FEM/decoder in one batched pass (Eq. 10)
        decoded = self.fem_decode_many(feats.query, pairs)
        low, aux = decoded[0]
        logits = resize_bilinear(low, query_images.shape[-2:])
        losses = self.segmentation_losses(logits, aux, query_masks)
        losses["loss"] = losses["main"] + self.aux_weight * losses["aux"]
        if self.ce_weight > 0:
            contrast_logits = decoded[1][0]
            losses["contrast"] = cross_entropy_ignore(resize_bilinear(contrast_logits, pseudo.shape[-2:]), pseudo)
            losses["loss"] = losses["loss"] + self.ce_weight * losses["contrast"]  # Eq. 13
        return ModelOutput(logits=logits, losses=losses)

    # -- LPS + CE (training only) ------------------------------------------------------------
    def latent_prototype_sampling(self, feats: PFENetFeatures, base_masks: torch.Tensor):
        """LPS (Eq. 1-7): latent region at feature size, v_l, pseudo mask M_q' at label size."""
        excluded = base_class_locations(base_masks, feats.query_high.shape[-2:])
        region, found = latent_prototype_region(
            feats.query_high, excluded, self.delta, self.sigma, self.generator, self.reference_diagonal_quirk
        )
        region = resize_bilinear(region[:, None], feats.query.shape[-2:])
        latent = masked_average_pool(feats.query, region, PFENET_MAP_EPS)  # Eq. 7
        pseudo = latent_pseudo_mask(region[:, 0], base_masks, found)  # Eq. 4-6
        return latent, pseudo

    def contrastive_inputs(self, feats: PFENetFeatures, base_masks: torch.Tensor):
        """The latent prototype v_l, its prior (Eq. 8-9) and the pseudo mask M_q'."""
        latent, pseudo = self.latent_prototype_sampling(feats, base_masks)
        # Eq. 8-9 in float32 even under bf16 autocast (min-max stretching of bf16 cosines is coarse)
        with torch.autocast(feats.query.device.type, enabled=False):
            prior = prototype_cosine_prior(feats.query.float(), latent.float())
        return latent, prior, pseudo

    def contrastive_enhancement(self, feats: PFENetFeatures, base_masks: torch.Tensor):
        """CE (Eq. 8-10) on its own: the shared FEM/decoder with the latent prototype and its prior."""
        latent, prior, pseudo = self.contrastive_inputs(feats, base_masks)
        logits, _ = self.fem_decode(feats.query, latent, prior)  # Eq. 10
        return logits, pseudo

    # -- K-shot inference ---------------------------------------------------------------------
    def forward_infer(self, support_images, support_masks, query_images) -> torch.Tensor:
        if self.kshot_mode == "avg":
            return super().forward_infer(support_images, support_masks, query_images)
        return self.vote(support_images, support_masks, query_images, int(self.kshot_mode.split("-")[1]))

    def vote(self, support_images, support_masks, query_images, threshold: int) -> torch.Tensor:
        """K 1-shot passes; logits ``[threshold - 0.5, votes]`` so argmax = (votes >= threshold)."""
        batch, shots = support_masks.shape[:2]
        if threshold > shots:
            raise ConfigError(
                f"kshot_mode 'vote-{threshold}' needs at least {threshold} supports, got {shots}; "
                f"use a smaller v or kshot_mode 'avg'."
            )
        one_shot = super().forward_infer(
            support_images.flatten(0, 1)[:, None],
            support_masks.flatten(0, 1)[:, None],
            query_images.repeat_interleave(shots, dim=0),
        )
        votes = (one_shot.argmax(dim=1) == 1).unflatten(0, (batch, shots)).sum(dim=1).to(one_shot.dtype)
        return torch.stack([torch.full_like(votes, threshold - 0.5), votes], dim=1)


@register_importer("celp")
def import_celp(path, dataset: str | None = None, shot: int = 1, pyramid_bins=None, **knobs) -> tuple[FSSModel, dict]:
    """Load a released CELP (PFENet-based) checkpoint: like :func:`fss.models.methods.pfenet.import_pfenet`
    but with the shared ``down_feat``, and CELP's scripts save it unwrapped (no ``module.``;
    both are read); extra CELP knobs (e.g. ``kshot_mode``) may be given."""
    return build_from_reference(path, "celp", "celp", dataset=dataset, shot=shot, pyramid_bins=pyramid_bins, **knobs)
