"""Building blocks shared by the methods (write once, reuse).

Append new shared blocks here with a docstring citing the paper equation they implement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: MAP eps of the CANet reference (``area = ... + 0.0005``), at feature resolution; CANet,
#: SimPropNet and DPNet (both bases) pool with it
CANET_MAP_EPS = 5e-4


def masked_average_pool(feat: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """MAP(F, M) = sum(F * M) / (sum(M) + eps) over the spatial axes.

    ``feat`` is ``[B, C, H, W]``, ``mask`` ``[B, 1, H, W]`` or ``[B, H, W]`` (float, same
    spatial size). Returns ``[B, C]``. PANet uses eps 1e-5 at image resolution, PFENet
    5e-4 at feature resolution (the caller chooses).
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = mask.to(feat.dtype)
    return (feat * mask).sum(dim=(2, 3)) / (mask.sum(dim=(2, 3)) + eps)


def bilinear_matrix(n_in: int, n_out: int, align_corners: bool = False, device=None) -> torch.Tensor:
    """``[n_out, n_in]`` matrix of 1-D bilinear resizing, exactly as ``F.interpolate`` computes it.

    Built by resizing the columns of the identity with ``F.interpolate`` itself, so edge
    clamping and the ``align_corners`` convention are torch's. A 2-D bilinear resize is
    separable: ``resize(x) = R_h @ x @ R_w.T`` for every channel.
    """
    eye = torch.eye(n_in, device=device, dtype=torch.float32).view(n_in, 1, n_in, 1)
    columns = F.interpolate(eye, size=(n_out, 1), mode="bilinear", align_corners=align_corners)
    return columns[:, 0, :, 0].T


def upsampled_masked_average_pool(feat: torch.Tensor, mask: torch.Tensor, eps: float,
                                  align_corners: bool = False) -> torch.Tensor:
    """``MAP(resize(F, mask size), M)`` without building the resized feature map.

    Equal (in exact arithmetic; to float rounding in practice) to bilinearly upsampling
    ``feat [B, C, h, w]`` to the size of ``mask [B, 1, H, W]`` and pooling with
    :func:`masked_average_pool` (PANet's prototype, Eq. 1-2, at image resolution). Resizing
    is linear, ``resize(F) = R_h F R_w^T``, so ``sum(resize(F) * M) = sum(F * (R_h^T M R_w))``:
    the mask is brought down to ``h x w`` by the transposed resize and the feature stays at
    feature resolution. For a ``[4, 256, 7, 7]`` feature and 49 x 49 masks this is about 50x
    faster forward plus backward on a CPU core, and it never allocates the ``C x H x W`` map
    (512 x 417 x 417 floats per support image with PANet's VGG-16).
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    (h, w), (big_h, big_w) = feat.shape[-2:], mask.shape[-2:]
    mask = mask.to(torch.float32)
    if (h, w) == (big_h, big_w):
        weights = mask[:, 0]
    else:
        rows = bilinear_matrix(h, big_h, align_corners, feat.device)  # [H, h]
        cols = bilinear_matrix(w, big_w, align_corners, feat.device)  # [W, w]
        weights = torch.einsum("Hh,bHW,Ww->bhw", rows, mask[:, 0], cols)
    pooled = torch.einsum("bchw,bhw->bc", feat, weights.to(feat.dtype))
    return pooled / (mask.sum(dim=(2, 3)).to(feat.dtype) + eps)


def cosine_map(feat: torch.Tensor, proto: torch.Tensor, scale: float = 1.0, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of every location of ``feat [B, C, H, W]`` with ``proto [B, C]``.

    Returns ``[B, H, W]`` multiplied by ``scale`` (PANet: alpha = 20). ``eps`` follows
    ``torch.nn.functional.cosine_similarity`` (PANet's reference uses that function).
    """
    return F.cosine_similarity(feat, proto[..., None, None], dim=1, eps=eps) * scale


class ASPPHead(torch.nn.Module):
    """CANet's ASPP-like decoder head (also SimPropNet's and DPNet's decoder).

    Branches on the input ``x [B, C, h, w]``: global average pool -> 1x1 conv; 1x1 conv;
    3x3 convs with dilation 6, 12, 18; each followed by ReLU + Dropout2d(0.5); the global
    branch is tiled back to ``h x w``. The five are concatenated -> 1x1 conv -> ``channels``
    + ReLU + Dropout2d(0.5) -> 1x1 conv -> ``num_classes`` logits (CANet reference
    ``layer6_0..layer6_4``, ``layer7``, ``layer9``).
    """

    def __init__(self, in_channels: int, channels: int = 256, num_classes: int = 2,
                 dilations: tuple[int, ...] = (6, 12, 18), dropout: float = 0.5) -> None:
        super().__init__()
        nn = torch.nn

        def branch(kernel: int, dilation: int = 1) -> torch.nn.Sequential:
            pad = dilation * (kernel // 2)
            return nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel, padding=pad, dilation=dilation, bias=True),
                nn.ReLU(inplace=True),
                nn.Dropout2d(p=dropout),
            )

        self.global_branch = branch(1)
        self.branches = nn.ModuleList([branch(1)] + [branch(3, d) for d in dilations])
        self.project = nn.Sequential(
            nn.Conv2d(channels * (len(dilations) + 2), channels, 1, bias=True),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=dropout),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1, bias=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The projected ``channels``-wide feature before the classifier."""
        pooled = self.global_branch(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([pooled] + [b(x) for b in self.branches], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------
# PFENet family (PFENet, APANet, CELP, DPNet-on-PFENet): prior masks, cosine
# k-means, latent prototype sampling, a CE that tolerates all-ignored targets.
# ---------------------------------------------------------------------------

#: eps of PFENet's ``Weighted_GAP`` (masked average pooling at feature resolution).
PFENET_MAP_EPS = 5e-4
#: eps of PFENet's prior mask (cosine denominator and min-max normalisation).
PRIOR_EPS = 1e-7


def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True`` (every PFENet-family interpolation)."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def min_max_normalise(x: torch.Tensor, eps: float = PRIOR_EPS) -> torch.Tensor:
    """``(x - min) / (max - min + eps)`` over the last axis (PFENet prior; CELP Eq. 9)."""
    low = x.min(dim=-1, keepdim=True).values
    high = x.max(dim=-1, keepdim=True).values
    return (x - low) / (high - low + eps)


def prior_mask(query_high: torch.Tensor, support_high: torch.Tensor, eps: float = PRIOR_EPS) -> torch.Tensor:
    """PFENet's training-free prior mask.

    ``query_high [B, C, h, w]`` and ``support_high [B, C, h', w']`` are high-level (block-4)
    features, the support already multiplied by its mask. For every query location: the
    largest cosine similarity with any support location (``eps`` in the denominator), then
    min-max normalised over the query locations of each sample (same ``eps``).
    Returns ``[B, 1, h, w]`` in float32 (computed without autocast).
    """
    with torch.autocast(query_high.device.type, enabled=False):
        q = query_high.float().flatten(2)  # B, C, Nq
        s = support_high.float().flatten(2).transpose(1, 2)  # B, Ns, C
        norms = torch.bmm(s.norm(dim=2, keepdim=True), q.norm(dim=1, keepdim=True))
        similarity = torch.bmm(s, q) / (norms + eps)  # B, Ns, Nq
        prior = min_max_normalise(similarity.max(dim=1).values, eps)
    return prior.view(q.shape[0], 1, *query_high.shape[-2:])


def prototype_cosine_prior(feat: torch.Tensor, prototype: torch.Tensor, eps: float = PRIOR_EPS) -> torch.Tensor:
    """Min-max normalised cosine of ``feat [B, C, h, w]`` with a prototype (CELP Eq. 8-9).

    ``prototype`` is ``[B, C]`` (one vector, CELP's latent prototype) or ``[B, C, h, w]``
    (one prototype per location, APANet's expanded prototypes). As CELP's reference
    ``compute_similar``: ``dot / (|p| |f| + eps)``, then ``(s - min) / (max - min + eps)``
    per sample. Gradients flow into both inputs. Returns ``[B, 1, h, w]``.
    """
    if prototype.dim() == 2:
        prototype = prototype[..., None, None]
    dot = (feat * prototype).sum(dim=1)
    similarity = dot / (feat.norm(dim=1) * prototype.norm(dim=1) + eps)
    return min_max_normalise(similarity.flatten(1), eps).view_as(similarity).unsqueeze(1)


def _uniform_noise(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """U(0, 1) noise drawn from ``generator`` (on its own device) and moved to ``device``."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def cosine_kmeans(
    x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means with cosine distance (APANet Eq. 4), for every sample of a batch at once.

    ``x [B, N, C]``: N feature vectors per sample. Initial centres are k distinct points of
    each sample drawn with ``generator`` (CPU noise, so one generator state gives the same
    clusters on every device); then ``iters`` rounds of (assign every point to the centre of
    highest cosine, centre = normalised sum of its points; a centre that loses all its points
    stays where it was). Returns ``assign [B, N]`` (long, 0..k-1, nearest final centre) and
    ``centers [B, k, C]`` (unit norm). Runs without gradients, in float32, on ``x``'s device.
    """
    batch, n, channels = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"cosine_kmeans needs 1 <= k <= N, got k={k}, N={n}")
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        points = F.normalize(x.float(), dim=2)
        first = _uniform_noise((batch, n), generator, x.device).argsort(dim=1)[:, :k]
        centers = torch.gather(points, 1, first[..., None].expand(batch, k, channels))
        for _ in range(iters):
            assign = torch.bmm(points, centers.transpose(1, 2)).argmax(dim=2)
            members = F.one_hot(assign, k).to(points.dtype)  # B, N, k
            sums = torch.bmm(members.transpose(1, 2), points)  # B, k, C
            counts = members.sum(dim=1)[..., None]
            centers = torch.where(counts > 0, F.normalize(sums, dim=2), centers)
        assign = torch.bmm(points, centers.transpose(1, 2)).argmax(dim=2)
    return assign, centers


def latent_prototype_region(
    query_high: torch.Tensor,
    excluded: torch.Tensor,
    delta: float = 0.65,
    sigma: float = 10,
    generator: torch.Generator | None = None,
    reference_quirk: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CELP's latent prototype sampling (LPS, Eq. 1-4), batched.

    ``query_high [B, C, h, w]``: block-4 query features; ``excluded [B, h, w]`` (bool):
    locations of annotated base classes (and, as in the reference, of ignore pixels).
    A = cosine similarity between all pairs of locations (Eq. 1, eps 1e-7); rows and columns
    of excluded locations and the diagonal are zeroed; A is binarised at ``A > delta``;
    n_j = number of similar locations (Eq. 2); candidate centres have ``n_j > sigma`` (Eq. 3;
    the reference's strict ``>``); one centre is drawn uniformly per sample; the latent
    region is the centre's row of A (Eq. 4).

    ``reference_quirk`` reproduces CELP's code: only element (0, 0) of the diagonal is
    zeroed (so other centres count and include themselves) and location 0 gets a bonus of
    ``sigma + 1`` (the code's ``+ 11`` for sigma 10), so it is always a candidate.

    Returns ``region [B, h, w]`` (float 0/1; all zero for a sample without candidates) and
    ``found [B]`` (bool: the sample had a candidate centre).
    """
    batch, _, h, w = query_high.shape
    with torch.no_grad(), torch.autocast(query_high.device.type, enabled=False):
        f = query_high.float().flatten(2)  # B, C, N
        norms = f.norm(dim=1, keepdim=True)  # B, 1, N
        similarity = torch.bmm(f.transpose(1, 2), f) / (torch.bmm(norms.transpose(1, 2), norms) + PRIOR_EPS)
        out = excluded.flatten(1).to(torch.bool)
        similarity = similarity.masked_fill(out[:, None, :], 0).masked_fill(out[:, :, None], 0)
        if reference_quirk:
            similarity[:, 0, 0] = 0
        else:
            similarity.diagonal(dim1=1, dim2=2).zero_()
        similar = (similarity > delta).float()
        counts = similar.sum(dim=1)
        if reference_quirk:
            counts[:, 0] += sigma + 1
        candidates = counts > sigma
        found = candidates.any(dim=1)
        noise = _uniform_noise(candidates.shape, generator, f.device)
        centre = torch.where(candidates, noise, torch.full_like(noise, -1.0)).argmax(dim=1)
        region = similar[torch.arange(batch, device=f.device), centre] * found[:, None]
    return region.view(batch, h, w), found


def latent_pseudo_mask(region: torch.Tensor, base_masks: torch.Tensor, found: torch.Tensor | None = None) -> torch.Tensor:
    """CELP's pseudo mask M_q' (Eq. 4-6) at label resolution.

    ``region [B, h, w]`` (0/1 at feature size) is resized bilinearly (align_corners=True) to
    the size of ``base_masks [B, H, W]`` (1 on any base class, 0 elsewhere, 255 ignore):
    1 where the resized region is >= 0.25, 0 where ``base_masks == 1`` (this wins, as in the
    reference), 255 elsewhere. Samples with ``found == False`` are all 255 (left out).
    """
    up = resize_bilinear(region[:, None].float(), base_masks.shape[-2:])[:, 0]
    target = torch.full_like(base_masks, 255)
    target[up >= 0.25] = 1
    target[base_masks == 1] = 0
    if found is not None:
        target[~found.to(torch.bool)] = 255
    return target


def cross_entropy_ignore(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255,
                         fg_weight: float = 1.0) -> torch.Tensor:
    """Mean cross-entropy over the pixels whose target is not ``ignore_index``.

    Equals ``F.cross_entropy(..., ignore_index=...)`` but returns 0 (keeping the graph)
    instead of NaN when every pixel is ignored. ``fg_weight`` != 1 weights the foreground
    pixels (class 1 of a binary episode, any class > 0 of an N-way one): ``sum(w * ce) /
    sum(w)``, torch's class-weighted mean.
    """
    target = target.long()
    if fg_weight != 1.0:
        ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
        weight = torch.where(target > 0, fg_weight, 1.0) * (target != ignore_index)
        return (ce * weight).sum() / weight.sum().clamp(min=1e-6)
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp(min=1)
