"""APANet (adaptive prototypes alignment: class-specific + class-agnostic prototypes), on PFENet.

Class-specific branch = PFENet (Eq. 1-3). The class-agnostic branch (Eq. 4-8) runs in
training only and reuses every parameter of the comparison module g_phi (PFENet's FEM and
decoder, :meth:`PFENet.fem_decode`); inference is PFENet's, at PFENet's cost.

Decisions where the paper leaves room (each stated here and in the knob help):

* F_q, the feature the class-agnostic prototypes are pooled from (Eq. 6), is the reduced
  mid-level query feature (PFENet's ``down_query`` output, the same tensor the class-specific
  branch compares with; the only width g_phi accepts). Clustering (Eq. 4) runs on F_bar_q,
  the block-4 query feature (Section IV-B: "the high-level prior feature F_bar_q is obtained
  from the last block"), over all locations; Eq. 5 then removes the query foreground.
* Query masks at feature size: foreground / ignore = bilinear resize (align_corners=True) of
  ``M_q == 1`` / ``M_q == 255`` >= 0.5. Region masks M_k exclude foreground and ignore
  locations; background and ignore locations are expanded with their own cluster's
  prototype, foreground locations with the negative prototype (``fg_negative``).
* ``random_query`` draws ONE prototype per sample among its non-empty regions and pairs it
  with every foreground location (Section III-C-2, Fig. 5).
* The FEM needs a prior channel the paper does not define for Eq. 7; ``agnostic_prior``
  chooses it: ``prototype_cosine`` (default; min-max normalised cosine of each query
  location with its assigned prototype, the construction CELP Eq. 8-9 uses for a non-support
  prototype), ``support`` (reuse the class-specific prior) or ``zero``.
* PFENet's auxiliary (per-bin) losses apply to the class-specific branch only (Eq. 9 has
  two CE terms); total = (1 - lam) * main + lam * class_agnostic + aux_weight * aux. When
  the branch is off (n_clusters = 0, assignment (a), or lam = 0) it is not computed and the
  loss is exactly PFENet's.
* Fig. 1 (b): one prototype from the support background, (c): one from the query background
  (both paired with every query location); (d): n clusters. ``fg_negative`` and
  ``prototype_generator`` apply to (d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fss.models.base import ModelOutput
from fss.models.blocks import (
    PFENET_MAP_EPS,
    cosine_kmeans,
    cross_entropy_ignore,
    masked_average_pool,
    prototype_cosine_prior,
    resize_bilinear,
)
from fss.models.methods.pfenet import PFENET_BACKBONES, PFENET_KNOBS, PFENet, PFENetFeatures
from fss.models.registry import Knob, register_method

APANET_KNOBS = {
    **PFENET_KNOBS,
    "n_clusters": Knob(3, int, "class-agnostic prototypes per query (k-means on block 4); 0 = PFENet baseline", low=0, high=5, table="Table IV"),
    "lam": Knob(0.5, float, "lambda of Eq. 9: (1-lam)*CE_main + lam*CE_class_agnostic", low=0.0, high=1.0, table="Table VII"),
    "assignment": Knob(
        "d", str,
        "Fig. 1: (a) no class-agnostic branch, (b) one prototype from the support background, "
        "(c) one from the query background, (d) n_clusters from the query",
        choices=("a", "b", "c", "d"), table="Table V",
    ),
    "fg_negative": Knob(
        "random_query", str,
        "prototype paired with the query foreground in (d): a random class-agnostic one (Fig. 5), "
        "the whole query background's, or the support background's",
        choices=("random_query", "query_background", "support_background"), table="Table VI",
    ),
    "prototype_generator": Knob(
        "kmeans", str, "regions of (d): cosine k-means on block 4, or an spp_bins x spp_bins grid",
        choices=("kmeans", "spp"), table="Table VIII",
    ),
    "spp_bins": Knob(4, int, "grid side a of the spp generator (a*a prototypes)", low=2, high=5, table="Table VIII"),
    "kmeans_iters": Knob(10, int, "k-means iterations (paper: 10)", low=1, high=100),
    "agnostic_prior": Knob(
        "prototype_cosine", str,
        "prior channel of the class-agnostic branch (not defined by the paper): cosine of each "
        "location with its prototype (CELP-style), the class-specific prior, or zeros",
        choices=("prototype_cosine", "support", "zero"),
    ),
}


def grid_regions(h: int, w: int, bins: int, device) -> torch.Tensor:
    """Cell index (0..bins*bins-1) of every location of an h x w map cut into a bins x bins grid."""
    rows = torch.arange(h, device=device) * bins // h
    cols = torch.arange(w, device=device) * bins // w
    return (rows[:, None] * bins + cols[None, :]).flatten()


def query_regions(query_masks: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and ignore locations ``[B, h, w]`` (bool) of the query label at feature size."""
    fg = resize_bilinear((query_masks == 1).float()[:, None], size)[:, 0] >= 0.5
    ignore = resize_bilinear((query_masks == 255).float()[:, None], size)[:, 0] >= 0.5
    return fg, ignore & ~fg


def class_agnostic_target(query_masks: torch.Tensor) -> torch.Tensor:
    """1 - M_q with ignore (255) kept: the class-agnostic branch's label (Eq. 9)."""
    return torch.where(query_masks == 255, query_masks, 1 - query_masks)


@register_method("apanet", base="pfenet", knobs=APANET_KNOBS, backbones=PFENET_BACKBONES, display="APANet")
class APANet(PFENet):
    """APANet: PFENet + a training-only class-agnostic branch sharing g_phi."""

    def __init__(
        self,
        *,
        n_clusters: int,
        lam: float,
        assignment: str,
        fg_negative: str,
        prototype_generator: str,
        spp_bins: int,
        kmeans_iters: int,
        agnostic_prior: str,
        **pfenet_knobs,
    ) -> None:
        super().__init__(**pfenet_knobs)
        self.n_clusters = n_clusters
        self.lam = lam
        self.assignment = assignment
        self.fg_negative = fg_negative
        self.prototype_generator = prototype_generator
        self.spp_bins = spp_bins
        self.kmeans_iters = kmeans_iters
        self.agnostic_prior = agnostic_prior
        #: random source of k-means initialisation and of the random negative (None: torch's global RNG)
        self.generator: torch.Generator | None = None

    @property
    def class_agnostic_enabled(self) -> bool:
        return self.assignment != "a" and self.n_clusters > 0 and self.lam > 0

    def forward_train(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        query_images, query_masks = batch["query_images"], batch["query_masks"]
        feats = self.extract_features(batch["support_images"], batch["support_masks"], query_images)
        if not self.class_agnostic_enabled:
            low, aux = self.fem_decode(feats.query, feats.prototype, feats.prior)  # Eq. 2-3
            logits = resize_bilinear(low, query_images.shape[-2:])
            losses = self.segmentation_losses(logits, aux, query_masks)
            losses["loss"] = losses["main"] + self.aux_weight * losses["aux"]
            return ModelOutput(logits=logits, losses=losses)
        # both branches through the shared g_phi in one batched pass (Eq. 2-3 and Eq. 7-8)
        (low, aux), (agnostic, _) = self.fem_decode_many(
            feats.query, [(feats.prototype, feats.prior), self.class_agnostic_inputs(feats, query_masks)]
        )
        logits = resize_bilinear(low, query_images.shape[-2:])
        losses = self.segmentation_losses(logits, aux, query_masks)
        agnostic = resize_bilinear(agnostic, query_images.shape[-2:])
        losses["class_agnostic"] = cross_entropy_ignore(agnostic, class_agnostic_target(query_masks))
        losses["loss"] = (  # Eq. 9 (+ PFENet's aux losses on the class-specific branch)
            (1 - self.lam) * losses["main"] + self.lam * losses["class_agnostic"] + self.aux_weight * losses["aux"]
        )
        return ModelOutput(logits=logits, losses=losses)

    # -- class-agnostic branch (training only) ---------------------------------------------
    def class_agnostic_inputs(self, feats: PFENetFeatures, query_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E_q(p_q), prior)``, the input of g_phi in the class-agnostic branch (Eq. 7)."""
        fg, ignore = query_regions(query_masks, feats.query.shape[-2:])
        expanded = self.expanded_prototypes(feats, fg, ignore)
        return expanded, self.class_agnostic_prior(feats, expanded)

    def class_agnostic_branch(self, feats: PFENetFeatures, query_masks: torch.Tensor) -> torch.Tensor:
        """M_qq = g_phi(concat(E_q(p_q), F_q)) at feature resolution (Eq. 7-8), on its own."""
        logits, _ = self.fem_decode(feats.query, *self.class_agnostic_inputs(feats, query_masks))
        return logits

    def expanded_prototypes(self, feats: PFENetFeatures, fg: torch.Tensor, ignore: torch.Tensor) -> torch.Tensor:
        """E_q (Eq. 7): ``[B, D]`` for Fig. 1 (b)/(c), ``[B, D, h, w]`` for (d)."""
        if self.assignment == "b":
            return self.support_background_prototype(feats)
        if self.assignment == "c":
            return masked_average_pool(feats.query, ~fg & ~ignore, PFENET_MAP_EPS)
        prototypes, assign, regions = self.class_agnostic_prototypes(feats, fg, ignore)
        per_location = torch.gather(prototypes, 1, assign[..., None].expand(-1, -1, prototypes.shape[2]))
        negative = self.negative_prototype(feats, prototypes, regions, fg, ignore)
        per_location = torch.where(fg.flatten(1)[..., None], negative[:, None, :], per_location)
        return per_location.transpose(1, 2).unflatten(2, fg.shape[-2:])

    def class_agnostic_prototypes(self, feats: PFENetFeatures, fg: torch.Tensor, ignore: torch.Tensor):
        """Regions (Eq. 4), minus foreground and ignore (Eq. 5), and their prototypes (Eq. 6).

        Returns ``prototypes [B, n, D]``, ``assign [B, h*w]`` (region of every location) and
        ``regions [B, n, h, w]`` (float 0/1 masks M_k).
        """
        batch, _, h, w = feats.query.shape
        if self.prototype_generator == "spp":
            count = self.spp_bins**2
            assign = grid_regions(h, w, self.spp_bins, fg.device).expand(batch, -1)
        else:
            count = min(self.n_clusters, h * w)
            high = resize_bilinear(feats.query_high.float(), (h, w)).flatten(2).transpose(1, 2)
            assign, _ = cosine_kmeans(high, count, self.kmeans_iters, self.generator)
        regions = F.one_hot(assign, count).transpose(1, 2).unflatten(2, (h, w)).float()
        regions = regions * (~fg & ~ignore)[:, None].float()
        prototypes = masked_average_pool(
            feats.query.repeat_interleave(count, dim=0), regions.flatten(0, 1), PFENET_MAP_EPS
        ).unflatten(0, (batch, count))
        return prototypes, assign, regions

    def negative_prototype(self, feats, prototypes, regions, fg, ignore) -> torch.Tensor:
        """The prototype paired with every foreground location (Table VI), ``[B, D]``."""
        if self.fg_negative == "query_background":
            return masked_average_pool(feats.query, ~fg & ~ignore, PFENET_MAP_EPS)
        if self.fg_negative == "support_background":
            return self.support_background_prototype(feats)
        gen_device = self.generator.device if self.generator is not None else "cpu"
        noise = torch.rand(prototypes.shape[:2], generator=self.generator, device=gen_device).to(prototypes.device)
        non_empty = regions.flatten(2).sum(dim=2) > 0
        choice = torch.where(non_empty, noise, noise - 2).argmax(dim=1)
        return prototypes[torch.arange(prototypes.shape[0], device=prototypes.device), choice]

    def support_background_prototype(self, feats: PFENetFeatures) -> torch.Tensor:
        """MAP of the reduced support features over the support background, mean over shots."""
        background = 1 - feats.support_masks.flatten(0, 1)
        pooled = masked_average_pool(feats.supports.flatten(0, 1), background, PFENET_MAP_EPS)
        return pooled.unflatten(0, feats.support_masks.shape[:2]).mean(dim=1)

    def class_agnostic_prior(self, feats: PFENetFeatures, expanded: torch.Tensor) -> torch.Tensor:
        if self.agnostic_prior == "support":
            return feats.prior
        if self.agnostic_prior == "zero":
            return torch.zeros_like(feats.prior)
        # Eq. 8-9 in float32 even under bf16 autocast: min-max stretching of bf16 cosines
        # (8-bit mantissa) moves the prior by up to ~0.1
        with torch.autocast(feats.query.device.type, enabled=False):
            return prototype_cosine_prior(feats.query.float(), expanded.float())
