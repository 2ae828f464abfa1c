"""DPNet (dual prototype network, ``papers/dpnet.txt``), registered on both bases.

Pipeline (Fig. 2 of the paper), one shared implementation :class:`DPNet`:

1. **Front end (CANet's).** Frozen backbone up to block 3 ("only the layers before the 4-th
   block are adopted"; BatchNorm in eval mode unless ``backbone_bn_train``). Feature
   ``F = concat(layer2, layer3) -> 3x3 conv (dilation 2) -> 256 + ReLU + Dropout2d(0.5)``
   (knob ``feature_dropout``), shared by support and query. Prototype ``P_k = MAP(F_s,k, M_s,k)`` per shot (support
   mask resized bilinearly, align_corners=True, eps 5e-4, as CANet).
2. **CCM** (Eq. 1-3, :func:`cycle_candidates`): cosine similarity between the support and
   query features taken *before the last ReLU of block 3*; for every support foreground
   location i', ``j* = argmax_j cos(F_s[i'], F_q[j])``, ``i* = argmax_i cos(F_q[j*], F_s[i])``
   over all support locations; ``j*`` is a candidate when ``i*`` is foreground. The
   **discriminator** (two FC layers on ``concat(F_q[j], P_k)`` + sigmoid) keeps candidates
   with output > beta (``beta_train`` in training, ``beta_test`` at inference). ``P_q,k`` =
   mean of the kept query features (Eq. 3); none kept -> ``P_q,k = P_k``. ``L_dis`` = BCE of
   the discriminator on the kept candidates against the query label (Eq. 10).
3. **K shots**: the (P_k, P_q,k) pairs are averaged over the shots (CCM runs per shot).
4. **PIM** (Eq. 4-8, :class:`PrototypeInteraction`): ``X = conv1x1(concat(P, P_q))``,
   z-score normalised over its channels (no BatchNorm), ``W = sigmoid(FC2(ReLU(FC1(X))))``,
   ``P' = (1 + alpha W) P``, ``P_q' = (1 + alpha W) P_q``, ``F_q' = (1 + alpha W) F_q``.
5. **MSF** (:class:`MultiScaleFusion`): ``F_q'`` at full, 1/2 and 1/4 size, each
   concatenated with the tiled prototype and fused by its own 1x1 conv (+ ReLU), resized
   back and summed; once with ``P'`` and once with ``P_q'``.
6. **Decoder**: ``concat(MSF(P'), MSF(P_q'))`` -> ASPP + FC (:class:`fss.models.blocks.ASPPHead`)
   -> 2 logits at stride 8, upsampled bilinearly (align_corners=True) to the label size.
   **Auxiliary branch** (training only): its own ASPP + FC decoder on ``MSF(P')`` alone.
7. **Loss** (Eq. 11): ``L = L_seg + lambda1 * L_aux + lambda2 * L_dis``; CE ignores 255.

**The two registrations ("dpnet_canet", "dpnet_pfenet") are the same network.** Reading of
the paper: Table 1 lists DPNet(CANet) and DPNet(PFENet) with the same size (19.3M, against
19.0M for CANet and 35.0M for PFENet), DPNet uses no block 4 (PFENet's prior mask needs
block-4 features), its decoder is "ASPP and a fully connection layer" (not PFENet's FEM),
and the paper states it evaluates "our model with both two evaluation metrics" (CANet counts
ignore pixels as background, PFENet leaves them out; protocol section 5). The 1-shot means
match "surpasses 3.3% and 1.9% ... for CANet and PFENet" (55.4 + 3.3, 60.8 + 1.9), and the
1-shot multi-scale row of Table 6 (CANet metric) equals the DPNet(CANet) row. So neither the
prior mask nor the FEM is part of DPNet(PFENet): the ``base`` only says which baseline (and
hence which evaluation convention, ``ignore_index`` 255 vs None) a row is compared with.

**Pre-ReLU block-3 features** (:func:`stage_with_pre_relu`): block 3 is run with its final
ReLU split off, no hooks: for the "small" backbone ``layer3 = Sequential(conv, bn, relu,
conv, bn, relu)``, the pre-ReLU feature is the last BatchNorm's output; for the ResNets
(torchvision ``Bottleneck`` blocks, any stem) the last bottleneck is evaluated up to
``bn3(conv3(.)) + identity``; block 3's output is the ReLU of that, so the frozen backbone
runs once.

**What the paper leaves open, and the choice made here** (each a knob where it matters):
the features averaged into ``P_q`` (Eq. 3) are the reduced 256-channel query features
``F_q`` (the space of ``P``, since ``P_q = P`` when nothing is kept); the discriminator sees
``concat(F_q[j], P_k)`` with a hidden width ``dis_hidden``; labels at feature resolution
(support foreground for the cycle test, query labels for ``L_dis``) are the label pixels at
the align_corners=True sampling positions ``round(i (H-1)/(h-1))``; ``L_dis`` is the mean
BCE over the kept, non-ignored locations of each episode (Eq. 10's ``1/K``), averaged over
the episodes that have any (``dis_loss_set`` can widen it to all candidates); gradients of ``L_dis`` reach the discriminator and the feature layers; PIM's
widths (``2C -> C`` conv, ``C -> pim_hidden -> C`` FCs), z-score eps 1e-5 and ``alpha``'s
initial value (``pim_alpha_init``, 0: the residual starts as identity); MSF down-samples by
adaptive average pooling to ``(h-1)//f + 1`` and up-samples bilinearly, each scale's 1x1
conv is followed by a ReLU ("activation maps"), the P' and P_q' fusions have separate
weights unless ``msf_shared``; there is no CANet IOM (the paper's decoder is ASPP + FC);
multi-scale inference rescales the query only (the supports define the class) and averages
the softmax probabilities of the scales (the returned logits are their log); Table 3 measures
"without CCM" on the auxiliary branch of the full model (``infer_branch="aux"``).
With ResNet-50 the defaults give about 19.4M parameters (paper: 19.3M).

**Ablations as knobs.** Table 3 rows: ``pim=False, msf=False, ccm=False``; ``msf=False,
ccm=False``; ``ccm=False`` (the paper measures this row on the auxiliary branch of the full
model: ``infer_branch="aux"``); defaults. Table 4: ``pseudo_prototype`` none / global /
cosine / ccm. Table 5: ``lambda1`` x ``lambda2`` over {0, 0.5, 1.0, 1.2}. Fig. 5:
``beta_test`` 0..0.8 on one trained model (``beta_train`` stays 0.5). Table 6: ``multiscale``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fss.errors import ConfigError
from fss.models.backbones import build_backbone
from fss.models.backbones.resnet import Bottleneck
from fss.models.base import FSSModel, ModelOutput
from fss.models.blocks import CANET_MAP_EPS, ASPPHead, cross_entropy_ignore, masked_average_pool, resize_bilinear
from fss.models.registry import Knob, register_method

IGNORE_INDEX = 255
DPNET_BACKBONES = ("resnet50", "resnet101", "resnet50v2", "resnet101v2", "small")
PSEUDO_PROTOTYPES = ("none", "global", "cosine", "ccm")
#: MSF scales: full, 1/2 and 1/4 of the feature size
MSF_FACTORS = (1, 2, 4)
ZSCORE_EPS = 1e-5

DPNET_KNOBS = {
    "ccm": Knob(True, bool, "cycle comparison module (Table 3); False = no pseudo-prototype (P_q = P), "
                "which is pseudo_prototype=none", table="Table 3"),
    "pim": Knob(True, bool, "prototype interaction module, Eq. 4-8 (Table 3); False = P' = P, "
                "P_q' = P_q, F_q' = F_q", table="Table 3"),
    "msf": Knob(True, bool, "multi-scale fusion at full, 1/2, 1/4 size (Table 3); False = one "
                "full-size 1x1 fusion", table="Table 3"),
    "pseudo_prototype": Knob(
        "ccm", str, "source of P_q (Table 4): none (P_q = P), global (mean of the whole query "
        "feature), cosine (most similar query location of every support foreground location, no "
        "cycle test), ccm (cycle-consistent; default)", choices=PSEUDO_PROTOTYPES, table="Table 4"),
    "discriminator": Knob(True, bool, "filter the cosine/ccm candidates with the learned discriminator "
                          "(output > beta) and train it with L_dis; default True (paper)"),
    "beta_train": Knob(0.5, float, "discriminator threshold in training (paper 0.5)", low=0.0, high=1.0,
                       table="Fig. 5"),
    "beta_test": Knob(0.2, float, "discriminator threshold at inference only (paper 0.2; Fig. 5 sweeps "
                      "0..0.8)", low=0.0, high=1.0, table="Fig. 5", test_time=True),
    "lambda1": Knob(1.0, float, "weight of the auxiliary-branch loss L_aux, Eq. 11 (paper 1.0; 0 = "
                    "no auxiliary decoder)", low=0.0, high=10.0, table="Table 5"),
    "lambda2": Knob(1.0, float, "weight of the discriminator loss L_dis, Eq. 11 (paper 1.0)",
                    low=0.0, high=10.0, table="Table 5"),
    "dis_loss_set": Knob("kept", str, "locations L_dis is computed on: kept (Eq. 10, the candidates the "
                         "discriminator keeps; default) or candidates (all cycle candidates)",
                         choices=("kept", "candidates")),
    "multiscale": Knob(False, bool, "multi-scale inference: average the predictions of the rescaled "
                       "query (Table 6); default False", table="Table 6", test_time=True),
    "multiscale_scales": Knob([0.7, 1.0, 1.3], list, "query scales of multi-scale inference (paper "
                              "0.7, 1.0, 1.3)", low=0.1, high=4.0, item_kind=float, table="Table 6",
                              test_time=True),
    "infer_branch": Knob("main", str, "branch decoded at inference: main (default) or aux (fusion with "
                         "P' alone; Table 3 measures 'without CCM' this way)", choices=("main", "aux"),
                         table="Table 3", test_time=True),
    "pim_hidden": Knob(64, int, "width of PIM's first FC layer (paper: unspecified; default 64)",
                       low=1, high=4096),
    "pim_alpha_init": Knob(0.0, float, "initial value of PIM's learnable alpha (paper: unspecified; "
                           "default 0 = identity at the start)", low=-10.0, high=10.0),
    "dis_hidden": Knob(64, int, "width of the discriminator's hidden FC layer (paper: unspecified; "
                       "default 64)", low=1, high=4096),
    "msf_shared": Knob(False, bool, "share the MSF convs between the P' and P_q' fusions (paper: "
                       "unspecified; default False = separate weights)"),
    "backbone_bn_train": Knob(False, bool, "compatibility: frozen backbone BatchNorm in train mode "
                              "(batch statistics); default False = eval mode"),
    "channels": Knob(256, int, "width of the reduced features, MSF and ASPP decoders (paper 256; the "
                     "embedded synthetic benchmark uses 64)", low=4, high=2048, small=16),
    "feature_dropout": Knob(0.5, float, "Dropout2d probability after the shared feature layer F, applied to "
                            "support and query separately (reference 0.5)", low=0.0, high=0.9),
}


# ---------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------

def _check_pre_relu_layout(stage: nn.Module) -> bool:
    """True when :func:`stage_with_pre_relu` can split the stage's final ReLU off."""
    if isinstance(stage, nn.Sequential) and len(stage) > 0:
        return _check_pre_relu_layout(stage[-1])
    return isinstance(stage, (nn.ReLU, Bottleneck))


def stage_with_pre_relu(stage: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a backbone stage; return ``(output, output before its final ReLU)``.

    Handles ``Sequential`` stages ending in an ``nn.ReLU`` (small backbone) or in a
    torchvision ``Bottleneck`` (ResNets: ``bn3(conv3(.)) + identity`` of the last block).
    """
    if isinstance(stage, nn.Sequential):
        modules = list(stage)
        for module in modules[:-1]:
            x = module(x)
        return stage_with_pre_relu(modules[-1], x)
    if isinstance(stage, nn.ReLU):
        return F.relu(x), x
    if isinstance(stage, Bottleneck):
        identity = x if stage.downsample is None else stage.downsample(x)
        out = stage.relu(stage.bn1(stage.conv1(x)))
        out = stage.relu(stage.bn2(stage.conv2(out)))
        pre = stage.bn3(stage.conv3(out)) + identity
        return F.relu(pre), pre
    raise TypeError(f"cannot split the final ReLU off a {type(stage).__name__}")


def labels_at(mask: torch.Tensor, size) -> torch.Tensor:
    """Label pixels of ``mask [..., H, W]`` at the align_corners=True sampling positions of a
    ``size`` grid (row i <- round(i (H-1)/(h-1))); keeps 255."""
    height, width = mask.shape[-2:]
    rows = torch.linspace(0, height - 1, int(size[0]), device=mask.device).round().long()
    cols = torch.linspace(0, width - 1, int(size[1]), device=mask.device).round().long()
    return mask[..., rows[:, None], cols[None, :]]


def cycle_candidates(
    support_pre: torch.Tensor, support_fg: torch.Tensor, query_pre: torch.Tensor, cycle: bool = True
) -> torch.Tensor:
    """CCM candidate locations (Eq. 1-2) for every (episode, shot).

    ``support_pre [B, K, C, hs, ws]``, ``support_fg [B, K, hs, ws]`` (bool, foreground
    labels at feature size), ``query_pre [B, C, hq, wq]``. For every support foreground
    location i': ``j* = argmax_j cos(F_s[i'], F_q[j])``; with ``cycle`` the location j* is
    kept only when ``i* = argmax_i cos(F_q[j*], F_s[i])`` (over all support locations) is
    foreground; without it (Table 4 "Cosine") every j* is kept. Returns ``[B, K, hq, wq]``
    bool. Computed without gradients in float32.
    """
    batch, shots = support_pre.shape[:2]
    with torch.no_grad(), torch.autocast(support_pre.device.type, enabled=False):
        s = F.normalize(support_pre.float().flatten(3), dim=2)  # B, K, C, Ns
        q = F.normalize(query_pre.float().flatten(2), dim=1)  # B, C, Nq
        similarity = torch.einsum("bkcs,bcq->bksq", s, q)  # B, K, Ns, Nq
        fg = support_fg.flatten(2).to(torch.bool)  # B, K, Ns
        forward_match = similarity.argmax(dim=3)  # j*(i'): B, K, Ns
        hits = torch.zeros(batch, shots, q.shape[-1], device=q.device)
        hits.scatter_add_(2, forward_match, fg.float())
        candidates = hits > 0
        if cycle:
            backward_match = similarity.argmax(dim=2)  # i*(j): B, K, Nq
            candidates &= torch.gather(fg, 2, backward_match)
    return candidates.view(batch, shots, *query_pre.shape[-2:])


class Discriminator(nn.Module):
    """Two FC layers on ``concat(location feature, prototype)``; sigmoid gives the
    probability that the location shares the prototype's class (CCM, Section "Cycle
    Comparison Module"). :meth:`forward` returns the logit (sigmoid applied by the caller)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2 * channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, feat: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        """``feat [B, C, h, w]``, ``prototype [B, K, C]`` -> logits ``[B, K, h, w]``."""
        batch, shots, channels = prototype.shape
        locations = feat.flatten(2).transpose(1, 2)  # B, N, C
        pairs = torch.cat(
            [
                locations[:, None].expand(-1, shots, -1, -1),
                prototype[:, :, None, :].expand(-1, -1, locations.shape[1], -1),
            ],
            dim=3,
        )
        logits = self.fc2(F.relu(self.fc1(pairs))).squeeze(-1)  # B, K, N
        return logits.view(batch, shots, *feat.shape[-2:])


class PrototypeInteraction(nn.Module):
    """PIM (Eq. 4-8): attention weights W from the prototype pair, applied with a learnable
    residual scale alpha to P, P_q and the query feature."""

    def __init__(self, channels: int, hidden: int, alpha_init: float = 0.0) -> None:
        super().__init__()
        self.merge = nn.Conv2d(2 * channels, channels, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def weights(self, prototype: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """W = sigmoid(FC2(ReLU(FC1(zscore(conv1x1(concat(P, P_q))))))) ``[B, C]`` (Eq. 4-5)."""
        x = self.merge(torch.cat([prototype, pseudo], dim=1)[..., None, None]).flatten(1)
        x = x.float()
        x = (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, unbiased=False, keepdim=True) + ZSCORE_EPS)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.to(prototype.dtype)))))

    def forward(self, prototype: torch.Tensor, pseudo: torch.Tensor, query: torch.Tensor):
        """``(P', P_q', F_q')`` with ``(1 + alpha W)`` applied channel-wise (Eq. 6-8)."""
        scale = 1 + self.alpha * self.weights(prototype, pseudo)
        return prototype * scale, pseudo * scale, query * scale[..., None, None].to(query.dtype)


class MultiScaleFusion(nn.Module):
    """MSF: the query feature at each scale factor (1, 2, 4 = full, 1/2, 1/4 size) fused
    with the tiled prototype by its own 1x1 conv + ReLU, resized back and summed."""

    def __init__(self, channels: int, factors: tuple[int, ...] = MSF_FACTORS) -> None:
        super().__init__()
        self.factors = tuple(factors)
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * channels, channels, 1), nn.ReLU(inplace=True)) for _ in self.factors
        )

    def forward(self, query: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
        height, width = query.shape[-2:]
        out = None
        for factor, fuse in zip(self.factors, self.fuse):
            size = ((height - 1) // factor + 1, (width - 1) // factor + 1)
            scaled = query if factor == 1 else F.adaptive_avg_pool2d(query, size)
            tiled = prototype[..., None, None].expand(-1, -1, *size).to(scaled.dtype)
            fused = resize_bilinear(fuse(torch.cat([scaled, tiled], dim=1)), (height, width))
            out = fused if out is None else out + fused
        return out


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------

class DPNet(FSSModel):
    """DPNet: support prototype + query pseudo-prototype (CCM), PIM, MSF, ASPP decoder."""

    feature_channels = 256  # the reference's width; knob ``channels``

    def __init__(
        self,
        backbone: str = "resnet50",
        shot: int = 1,
        backbone_weights: str | None = None,
        *,
        ccm: bool,
        pim: bool,
        msf: bool,
        pseudo_prototype: str,
        discriminator: bool,
        beta_train: float,
        beta_test: float,
        lambda1: float,
        lambda2: float,
        dis_loss_set: str,
        multiscale: bool,
        multiscale_scales,
        infer_branch: str,
        pim_hidden: int,
        pim_alpha_init: float,
        dis_hidden: int,
        msf_shared: bool,
        backbone_bn_train: bool,
        channels: int,
        feature_dropout: float,
        fg_weight: float,
    ) -> None:
        super().__init__(fg_weight=fg_weight)
        self.feature_channels = int(channels)
        self.feature_dropout = feature_dropout
        name = self.method_name
        if pseudo_prototype not in PSEUDO_PROTOTYPES:
            raise ConfigError(f"knob 'pseudo_prototype' of method '{name}' got {pseudo_prototype!r}; "
                              f"allowed values are {list(PSEUDO_PROTOTYPES)}.")
        if not ccm and pseudo_prototype in ("global", "cosine"):
            raise ConfigError(f"method '{name}': ccm=False means no pseudo-prototype but pseudo_prototype="
                              f"{pseudo_prototype!r}; set ccm=True or pseudo_prototype=none.")
        scales = [float(s) for s in multiscale_scales]
        if not scales or any(s <= 0 for s in scales):
            raise ConfigError(f"knob 'multiscale_scales' of method '{name}' got {multiscale_scales!r}; "
                              f"give positive scales, e.g. [0.7, 1.0, 1.3].")
        if infer_branch == "aux" and lambda1 <= 0:
            raise ConfigError(f"method '{name}': infer_branch='aux' needs the auxiliary branch, which "
                              f"lambda1=0 removes; set lambda1 > 0.")
        self.shot = shot
        self.pseudo_mode = pseudo_prototype if ccm else "none"
        self.use_pim, self.use_msf = pim, msf
        self.beta_train, self.beta_test = beta_train, beta_test
        self.lambda1, self.lambda2 = lambda1, lambda2
        self.dis_loss_set = dis_loss_set
        self.multiscale, self.multiscale_scales = multiscale, scales
        self.infer_branch = infer_branch
        self.backbone_bn_train = backbone_bn_train

        net = build_backbone(backbone, weights=backbone_weights)
        if not _check_pre_relu_layout(net.layer3):
            raise ConfigError(f"method '{name}' cannot take block-3 features before the last ReLU from "
                              f"backbone {backbone!r}; choose one of: {', '.join(DPNET_BACKBONES)}.")
        net.layer4 = nn.Identity()  # only the layers before block 4 are used
        for p in net.parameters():
            p.requires_grad_(False)
        self.backbone = net
        c = self.feature_channels
        in_channels = net.stage_channels["layer2"] + net.stage_channels["layer3"]
        self.feature_reduce = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=2, dilation=2), nn.ReLU(inplace=True), nn.Dropout2d(p=feature_dropout)
        )
        uses_candidates = self.pseudo_mode in ("cosine", "ccm")
        self.discriminator = Discriminator(c, dis_hidden) if uses_candidates and discriminator else None
        self.pim = PrototypeInteraction(c, pim_hidden, pim_alpha_init) if pim else None
        factors = MSF_FACTORS if msf else (1,)
        self.msf_prototype = MultiScaleFusion(c, factors)
        self.msf_pseudo = self.msf_prototype if msf_shared else MultiScaleFusion(c, factors)
        self.decoder = ASPPHead(2 * c, channels=c, num_classes=2)
        self.aux_decoder = ASPPHead(c, channels=c, num_classes=2) if lambda1 > 0 else None
        self.train(True)

    # ----------------------------------------------------------------- mode handling
    def train(self, mode: bool = True):
        super().train(mode)
        if not self.backbone_bn_train:
            self.backbone.eval()  # frozen backbone: BatchNorm with running statistics
        return self

    # ----------------------------------------------------------------- front end
    def backbone_features(self, images: torch.Tensor):
        """Frozen ``layer2``, ``layer3`` and ``layer3`` before its last ReLU (no gradients)."""
        bb = self.backbone

        def stages(rows):
            layer2 = bb.layer2(bb.layer1(bb.layer0(images[rows])))
            return layer2, stage_with_pre_relu(bb.layer3, layer2)[1]

        with torch.no_grad():  # frozen_features: the evaluation feature cache hook (base.py)
            layer2, layer3_pre = self.frozen_features("dpnet.layer3", stages, images)
            layer3 = F.relu(layer3_pre)  # what stage_with_pre_relu returns as the output
        return layer2, layer3, layer3_pre

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduced feature F ``[N, 256, h, w]`` and pre-ReLU block-3 feature ``[N, C3, h, w]``."""
        layer2, layer3, layer3_pre = self.backbone_features(images)
        layer2 = resize_bilinear(layer2, layer3.shape[-2:])
        return self.feature_reduce(torch.cat([layer2, layer3], dim=1)), layer3_pre

    def encode_episode(self, support_images, support_masks, query_images):
        """Query/support features (one backbone call when sizes agree) and shot prototypes."""
        if support_images.dim() != 5 or support_masks.dim() != 4:
            raise ConfigError(
                f"{self.method_name} is a 1-way method: support_images must be [B,K,3,H,W] and support_masks "
                f"[B,K,H,W], got {tuple(support_images.shape)} and {tuple(support_masks.shape)}."
            )
        batch, shots = support_images.shape[:2]
        flat_support = support_images.flatten(0, 1)
        if flat_support.shape[-2:] == query_images.shape[-2:]:
            feats, pre = self.encode(torch.cat([flat_support, query_images], dim=0))
            support_feat, query_feat = feats[: batch * shots], feats[batch * shots:]
            support_pre, query_pre = pre[: batch * shots], pre[batch * shots:]
        else:  # multi-scale inference: the query is rescaled, the supports are not
            support_feat, support_pre = self.encode(flat_support)
            query_feat, query_pre = self.encode(query_images)
        size = support_feat.shape[-2:]
        fg = (support_masks == 1).to(support_feat.dtype).flatten(0, 1).unsqueeze(1)
        prototypes = masked_average_pool(support_feat, resize_bilinear(fg, size), CANET_MAP_EPS)
        return {
            "query": query_feat,
            "query_pre": query_pre,
            "support_pre": support_pre.unflatten(0, (batch, shots)),
            "support_fg": labels_at(support_masks, size) == 1,
            "prototypes": prototypes.unflatten(0, (batch, shots)),
        }

    # ----------------------------------------------------------------- dual prototypes
    def pseudo_prototypes(self, enc: dict, beta: float, query_masks: torch.Tensor | None = None):
        """Per-shot pseudo-prototypes ``[B, K, C]`` (Eq. 3) and ``L_dis`` (Eq. 10, when
        ``query_masks`` is given and the discriminator is used; else None)."""
        query, prototypes = enc["query"], enc["prototypes"]
        mode = self.pseudo_mode
        if mode == "none":
            return prototypes, None
        if mode == "global":
            return query.mean(dim=(2, 3))[:, None].expand_as(prototypes), None
        candidates = cycle_candidates(enc["support_pre"], enc["support_fg"], enc["query_pre"], cycle=mode == "ccm")
        dis_loss = None
        kept = candidates
        if self.discriminator is not None:
            logits = self.discriminator(query, prototypes)  # B, K, h, w
            kept = candidates & (torch.sigmoid(logits.float()) > beta)
            if query_masks is not None:
                dis_loss = self.discriminator_loss(logits, kept if self.dis_loss_set == "kept" else candidates,
                                                   query_masks)
        weights = kept.to(query.dtype).flatten(2)  # B, K, N
        counts = weights.sum(dim=2, keepdim=True)
        pooled = torch.einsum("bkn,bcn->bkc", weights, query.flatten(2)) / counts.clamp(min=1)
        return torch.where(counts > 0, pooled, prototypes), dis_loss

    @staticmethod
    def discriminator_loss(logits: torch.Tensor, selected: torch.Tensor, query_masks: torch.Tensor) -> torch.Tensor:
        """BCE of the discriminator on the selected locations against the query label at
        feature resolution (Eq. 10): ``1/K`` over the K selected locations of each episode
        (and shot), then the mean over the episodes that have any (as the CE terms, a
        per-sample loss averaged over the batch); ignore-labelled locations are left out;
        0 if no episode has one."""
        labels = labels_at(query_masks, logits.shape[-2:])[:, None].expand_as(selected)
        valid = selected & (labels != IGNORE_INDEX)
        target = (labels == 1).float()
        terms = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        counts = valid.flatten(2).sum(dim=2)  # B, K
        per_episode = (terms * valid).flatten(2).sum(dim=2) / counts.clamp(min=1)
        has = counts > 0
        return (per_episode * has).sum() / has.sum().clamp(min=1)

    def fuse(self, enc: dict, beta: float, query_masks: torch.Tensor | None = None):
        """``MSF(F_q', P')``, ``MSF(F_q', P_q')`` and ``L_dis`` (K shots averaged first)."""
        pseudo, dis_loss = self.pseudo_prototypes(enc, beta, query_masks)
        prototype, pseudo = enc["prototypes"].mean(dim=1), pseudo.mean(dim=1)
        query = enc["query"]
        if self.pim is not None:
            prototype, pseudo, query = self.pim(prototype, pseudo, query)
        return self.msf_prototype(query, prototype), self.msf_pseudo(query, pseudo), dis_loss

    def decode(self, fused_prototype: torch.Tensor, fused_pseudo: torch.Tensor) -> torch.Tensor:
        """Main decoder (ASPP + FC) on ``concat(MSF(P'), MSF(P_q'))``: logits at stride 8."""
        return self.decoder(torch.cat([fused_prototype, fused_pseudo], dim=1))

    # ----------------------------------------------------------------- forward passes
    def forward_train(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        query_masks = batch["query_masks"]
        enc = self.encode_episode(batch["support_images"], batch["support_masks"], batch["query_images"])
        fused_prototype, fused_pseudo, dis_loss = self.fuse(enc, self.beta_train, query_masks)
        size = query_masks.shape[-2:]
        logits = resize_bilinear(self.decode(fused_prototype, fused_pseudo), size)
        seg = cross_entropy_ignore(logits, query_masks, fg_weight=self.fg_weight)
        total = seg
        zero = seg.new_zeros(())
        aux = zero
        if self.aux_decoder is not None:  # Eq. 11, auxiliary branch (training only)
            aux = cross_entropy_ignore(resize_bilinear(self.aux_decoder(fused_prototype), size), query_masks,
                                       fg_weight=self.fg_weight)
            total = total + self.lambda1 * aux
        dis = zero if dis_loss is None else dis_loss
        if dis_loss is not None and self.lambda2 > 0:
            total = total + self.lambda2 * dis_loss
        return ModelOutput(logits=logits, losses={"seg": seg, "aux": aux, "dis": dis, "loss": total})

    def infer_once(self, support_images, support_masks, query_images) -> torch.Tensor:
        """Single-scale inference: logits ``[B, 2, H, W]`` at the query's size (beta_test)."""
        enc = self.encode_episode(support_images, support_masks, query_images)
        fused_prototype, fused_pseudo, _ = self.fuse(enc, self.beta_test)
        if self.infer_branch == "aux":
            low = self.aux_decoder(fused_prototype)
        else:
            low = self.decode(fused_prototype, fused_pseudo)
        return resize_bilinear(low, query_images.shape[-2:])

    def forward_infer(self, support_images, support_masks, query_images) -> torch.Tensor:
        if not self.multiscale:
            return self.infer_once(support_images, support_masks, query_images)
        height, width = query_images.shape[-2:]
        probs = None
        for scale in self.multiscale_scales:  # Table 6: rescale, predict, resize back, average
            size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
            logits = self.infer_once(support_images, support_masks, resize_bilinear(query_images, size))
            p = resize_bilinear(logits.float(), (height, width)).softmax(dim=1)
            probs = p if probs is None else probs + p
        return (probs / len(self.multiscale_scales)).clamp_min(1e-12).log()


@register_method("dpnet_canet", base="canet", knobs=DPNET_KNOBS, backbones=DPNET_BACKBONES,
                 display="DPNet (CANet)",
                 help="DPNet (CCM + PIM + MSF dual prototypes), compared with CANet (Table 1, CANet metric).")
class DPNetCANet(DPNet):
    """DPNet (dual prototypes: CCM + PIM + MSF) compared with CANet (Table 1, CANet metric)."""


@register_method("dpnet_pfenet", base="pfenet", knobs=DPNET_KNOBS, backbones=DPNET_BACKBONES,
                 display="DPNet (PFENet)",
                 help="DPNet, compared with PFENet: the dpnet_canet network, scored with PFENet's metric.")
class DPNetPFENet(DPNet):
    """DPNet (dual prototypes: CCM + PIM + MSF) compared with PFENet; same network as
    dpnet_canet (see the module docstring), scored with PFENet's metric (ignore 255)."""
