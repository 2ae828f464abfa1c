"""SimPropNet (Gairola et al., IJCAI 2020) on CANet: DPr, FBAF and ICA.

Built from the paper (no reference code). The encoder is CANet's (frozen ResNet layers +
one 3x3 dilated conv to 256, :meth:`CANet.extract_features`); the decoder is CANet's ASPP
head ("ASPP + two convs", 2 logits at 1/8, bilinear up). Components, each a knob
(Table 4: baseline = all off = CANet, DPr, FBAF, DPr+FBAF, +ICA):

* **FBAF** (Section 3.4, Eq. 1-3) replaces CANet's dense comparison and IOM: the fusion's
  three residual 3x3 convs with instance norm take the place of the IOM's residual
  blocks, and the 2-channel attention maps take the slot of the 2-channel history mask.
  So with ``fbaf`` on there is no iterative refinement (``iom_iterations`` and the
  history knobs are unused); with ``fbaf`` off the model is CANet (dense comparison + IOM).
* **DPr** (Section 3.3), training only: the shared fusion + decoder also predicts every
  support's mask from the support's own feature (support-support comparison against the
  episode probe); CE with ignore 255, added to the query CE with weight 1.
* **ICA** (Section 3.6), training only: the (normalised) query image is replaced by its
  channel average with probability ``p = ica_p0 * exp(-ica_decay * progress)``, where
  ``progress = iteration / total_iterations`` is set by the training loop through
  :meth:`SimPropNet.set_train_progress` (0 until called).
* **K-shot** (Eq. 4): Z_f and Z_b are averaged over the supports.

Eq. 1 writes Z = mu_c(F_s * M_s), average pooling over the whole map, while the text calls
Z "MAP vectors" (a mask-weighted average); knob ``zpool`` picks: ``map`` (default,
sum(F*M)/(sum(M)+5e-4) as CANet's reference) or ``gap`` (Eq. 1 literally, sum(F*M)/(h*w)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fss.models.base import ModelOutput
from fss.models.blocks import CANET_MAP_EPS, ASPPHead, masked_average_pool
from fss.models.methods.canet import CANET_BACKBONES, CANET_KNOBS, IGNORE_INDEX, CANet, _resize, _split_episode
from fss.models.registry import Knob, register_method

SIMPROPNET_KNOBS = {
    **CANET_KNOBS,
    "dpr": Knob(True, bool, table="SimPropNet Table 4",
                help="dual prediction: also predict the support mask with the shared decoder (training only)"),
    "fbaf": Knob(True, bool, table="SimPropNet Table 4",
                 help="foreground/background attentive fusion (Eq. 1-3) instead of CANet's dense comparison + IOM"),
    "ica": Knob(True, bool, table="SimPropNet Table 4",
                help="input channel averaging of the query in training (Section 3.6)"),
    "ica_p0": Knob(0.25, float, low=0.0, high=1.0,
                   help="initial ICA probability (paper: 0.25)"),
    "ica_decay": Knob(5.0, float, low=0.0, high=100.0,
                      help="ICA decay rate: p = ica_p0 * exp(-ica_decay * iteration/total_iterations); "
                      "the paper gives no value, default 5.0 (p = 0.0017 at the end)"),
    "zpool": Knob("map", str, choices=("map", "gap"),
                  help="Z_f/Z_b pooling: map (default; mask-weighted average, eps 5e-4) or gap "
                  "(Eq. 1 literally: average over the whole feature map)"),
}


def similarity_attention(feat: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """C(F, Z) = (1 + cos(F, Z)) / 2 per location (Eq. 2 of SimPropNet): ``[B,C,h,w], [B,C] -> [B,1,h,w]``."""
    return (1.0 + F.cosine_similarity(feat, probe[..., None, None], dim=1).unsqueeze(1)) / 2.0


def pairwise_normalise(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """N(A, B) = (A / (A + B), B / (A + B)) (Eq. 2 of SimPropNet); eps guards A + B = 0."""
    total = (a + b).clamp_min(eps)
    return a / total, b / total


def fg_bg_attention(feat: torch.Tensor, z_fg: torch.Tensor, z_bg: torch.Tensor) -> torch.Tensor:
    """A^f, A^b = N(C(F, Z_f), C(F, Z_b)), concatenated ``[B,2,h,w]`` (Eq. 2)."""
    a_fg, a_bg = pairwise_normalise(similarity_attention(feat, z_fg), similarity_attention(feat, z_bg))
    return torch.cat([a_fg, a_bg], dim=1)


class FBAFusion(nn.Module):
    """Feature and attention-map fusion (Eq. 3 of SimPropNet).

    G0 = F (+) Z_f; G1 = IN(conv(G0) + G0); G2 = IN(conv(G1 (+) A_f (+) A_b) + G1);
    G = IN(conv(G2) + G2); (+) is channel concat, conv a 3x3 conv keeping 2C channels,
    IN instance norm (no affine parameters).
    """

    def __init__(self, channels: int = 256) -> None:
        super().__init__()
        width = 2 * channels
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(width + 2, width, 3, padding=1, bias=True)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=True)
        self.norm = nn.InstanceNorm2d(width, affine=False)
        self.out_channels = width

    def forward(self, feat: torch.Tensor, z_fg: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        g0 = torch.cat([feat, z_fg[..., None, None].expand(-1, -1, *feat.shape[-2:])], dim=1)
        g1 = self.norm(self.conv1(g0) + g0)
        g2 = self.norm(self.conv2(torch.cat([g1, attention.to(g1.dtype)], dim=1)) + g1)
        return self.norm(self.conv3(g2) + g2)


@register_method("simpropnet", base="canet", knobs=SIMPROPNET_KNOBS, backbones=CANET_BACKBONES,
                 display="SimPropNet")
class SimPropNet(CANet):
    """SimPropNet: CANet + dual prediction (DPr), FG/BG attentive fusion (FBAF), input channel averaging (ICA)."""

    def __init__(
        self,
        backbone: str = "resnet50",
        shot: int = 1,
        backbone_weights: str | None = None,
        *,
        dpr: bool,
        fbaf: bool,
        ica: bool,
        ica_p0: float,
        ica_decay: float,
        zpool: str,
        **canet_knobs,
    ) -> None:
        super().__init__(backbone=backbone, shot=shot, backbone_weights=backbone_weights, **canet_knobs)
        self.dpr = dpr
        self.fbaf = fbaf
        self.ica = ica
        self.ica_p0 = ica_p0
        self.ica_decay = ica_decay
        self.zpool = zpool
        self.train_progress = 0.0
        if fbaf:
            # FBAF takes the place of CANet's dense comparison and IOM residual blocks.
            del self.dense_compare
            del self.iom_blocks
            self.fusion = FBAFusion(self.feature_channels)
            self.head = ASPPHead(self.fusion.out_channels, channels=self.feature_channels, num_classes=2)

    # ----------------------------------------------------------------- schedule (ICA)
    def set_train_progress(self, fraction: float) -> None:
        """Training loop hook: ``fraction = iteration / total_iterations`` (clamped to [0, 1])."""
        self.train_progress = min(max(float(fraction), 0.0), 1.0)

    def ica_probability(self) -> float:
        """p = ica_p0 * exp(-ica_decay * progress) (Section 3.6: decays exponentially)."""
        return self.ica_p0 * math.exp(-self.ica_decay * self.train_progress)

    def channel_average(self, images: torch.Tensor) -> torch.Tensor:
        """ICA: with probability p per sample, replace the image by its channel mean (x3)."""
        p = self.ica_probability()
        if p <= 0:
            return images
        swap = torch.rand(images.shape[0], device=images.device) < p
        gray = images.mean(dim=1, keepdim=True).expand_as(images)
        return torch.where(swap[:, None, None, None], gray, images)

    # ----------------------------------------------------------------- FBAF pieces
    def probes(self, support_feats: torch.Tensor, support_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Z_f, Z_b (Eq. 1), averaged over the K supports (Eq. 4): two ``[B,C]``."""
        b, k = support_feats.shape[:2]
        feats = support_feats.flatten(0, 1)
        fg = _resize(self.foreground_mask(support_masks).flatten(0, 1).unsqueeze(1), feats.shape[-2:])
        fg = fg.to(feats.dtype)
        if self.zpool == "map":
            z_fg = masked_average_pool(feats, fg, CANET_MAP_EPS)
            z_bg = masked_average_pool(feats, 1.0 - fg, CANET_MAP_EPS)
        else:
            z_fg = (feats * fg).mean(dim=(2, 3))
            z_bg = (feats * (1.0 - fg)).mean(dim=(2, 3))
        return z_fg.view(b, k, -1).mean(dim=1), z_bg.view(b, k, -1).mean(dim=1)

    def fuse_and_decode(self, feat: torch.Tensor, z_fg: torch.Tensor, z_bg: torch.Tensor) -> torch.Tensor:
        """FBAF (Eq. 2-3) of one feature map with the probes, then the ASPP decoder: logits at 1/8."""
        return self.head(self.fusion(feat, z_fg, fg_bg_attention(feat, z_fg, z_bg)))

    def _predict(self, feat: torch.Tensor, support_feats, support_masks, training: bool) -> torch.Tensor:
        """Logits at 1/8 for ``feat`` given the episode's supports (FBAF or CANet path)."""
        if self.fbaf:
            z_fg, z_bg = self.probes(support_feats, support_masks)
            return self.fuse_and_decode(feat, z_fg, z_bg)
        compared = self.dense_comparison(feat, self.support_prototype(support_feats, support_masks))
        if training:
            return self.iom_decode(compared, self.training_history(compared))
        return self.iterate(compared, self.iom_iterations)

    # ----------------------------------------------------------------- forward passes
    def forward_train(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        support_images, support_masks = _split_episode(batch["support_images"], batch["support_masks"], self.method_name)
        query_images, query_masks = batch["query_images"], batch["query_masks"]
        if self.ica:
            query_images = self.channel_average(query_images)
        query_feat, support_feats = self.encode_episode(support_images, support_masks, query_images)
        logits = _resize(self._predict(query_feat, support_feats, support_masks, True), query_masks.shape[-2:])
        seg = self.segmentation_ce(logits, query_masks)
        losses = {"seg": seg}
        total = seg
        if self.dpr:
            losses["dpr"] = self.dual_prediction_loss(support_feats, support_masks)
            total = total + losses["dpr"]
        losses["loss"] = total
        return ModelOutput(logits=logits, losses=losses)

    def dual_prediction_loss(self, support_feats: torch.Tensor, support_masks: torch.Tensor) -> torch.Tensor:
        """DPr: every support's mask predicted from its own feature and the episode probe; CE ignore 255."""
        b, k = support_feats.shape[:2]
        feats = support_feats.flatten(0, 1)
        # Each support is decoded against the episode's probe (Z averaged over the K supports).
        if self.fbaf:
            z_fg, z_bg = self.probes(support_feats, support_masks)
            logits = self.fuse_and_decode(feats, z_fg.repeat_interleave(k, dim=0), z_bg.repeat_interleave(k, dim=0))
        else:
            prototype = self.support_prototype(support_feats, support_masks).repeat_interleave(k, dim=0)
            logits = self.iom_decode(self.dense_comparison(feats, prototype))
        labels = support_masks.flatten(0, 1).long()
        logits = _resize(logits, labels.shape[-2:])
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

    def forward_infer(self, support_images, support_masks, query_images) -> torch.Tensor:
        support_images, support_masks = _split_episode(support_images, support_masks, self.method_name)
        query_feat, support_feats = self.encode_episode(support_images, support_masks, query_images)
        return _resize(self._predict(query_feat, support_feats, support_masks, False), query_images.shape[-2:])
