"""Run a chosen set of metrics over image sets: the evaluation protocol behind ``ipl evaluate``
and ``benchmarks/table1.py``.

Inputs are tensors ``(N, 3, H, W)`` in ``[-1, 1]``: *source* images (from the source generator,
or the real inputs of a translation) paired one to one with *adapted* images (same latent /
same input), optional target-domain *reference* images (SIFID, one score per reference, as
Table 1's R1-R3), optional *real* target images (FID/KID) and optional *cluster centres*
(intra-cluster LPIPS; default: the references).

Metric names: ``is``, ``sifid``, ``scs``, ``id``, ``fid``, ``kid``, ``clip_score``,
``clip_direction``, ``pairwise_lpips``, ``intra_lpips``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ipl_diffusion.errors import UserError
from .clip_metrics import clip_directional_similarity, clip_score
from .diversity import FeatureDistance, intra_cluster_distance, mean_pairwise_distance
from .fid import PoolFeatures, fid, kid
from .hed import HED
from .identity import ArcFaceFeatures, identity_similarity
from .inception import InceptionV3
from .inception_score import INCEPTION_MIN_SIZE, inception_score, input_size
from .lpips import LPIPS
from .scs import structural_consistency
from .sifid import sifid

METRICS = ("is", "sifid", "scs", "id", "fid", "kid", "clip_score", "clip_direction", "pairwise_lpips", "intra_lpips")
HIGHER_IS_BETTER = {"is": True, "sifid": False, "scs": True, "id": True, "fid": False, "kid": False,
                    "clip_score": True, "clip_direction": True, "pairwise_lpips": True, "intra_lpips": True}


@dataclass
class MetricNetworks:
    """The feature networks a run needs; any may be ``None`` (metrics needing it are unavailable).

    ``identity_features``: ArcFace (faces) or any ``(B, 3, H, W) -> (B, D)`` extractor.
    ``diversity_distance``: ``LPIPS`` or any ``distance(a, b) -> (B,)`` (e.g. ``FeatureDistance``).
    ``clip``: a ``CLIPPromptEncoder`` built with an image processor.
    """

    inception: InceptionV3 | None = None
    fid_features: torch.nn.Module | None = None
    hed: HED | None = None
    identity_features: Callable | None = None
    diversity_distance: Callable | None = None
    clip: object | None = None
    clip_templates: str = "imagenet"
    diversity_name: str = "LPIPS"  # reported in the notes of the diversity rows
    identity_name: str = "ArcFace IR-SE50"  # reported in the note of the ID row

    @classmethod
    def from_weights(cls, inception_weights=None, fid_inception_weights=None, hed_weights=None, arcface_weights=None,
                     lpips_backbone_weights=None, lpips_lin_weights=None, lpips_net="alex", clip=None,
                     diversity_network="lpips", identity_network="arcface", device=None, clip_templates="imagenet"):
        """Load every network whose weights are given (paths or Hub ids; see ``metrics.weights``).

        ``clip``: a ``CLIPPromptEncoder``, or a CLIP folder / Hub id loaded with
        ``CLIPPromptEncoder.from_pretrained``. ``diversity_network="clip"`` uses CLIP image
        features (``FeatureDistance``) instead of LPIPS for the diversity metrics;
        ``identity_network="clip"`` uses the cosine of CLIP image features as ID for non-face
        domains (the paper's AFHQ recogniser is not public) instead of ArcFace.

        Raises:
            ValueError: an unknown network choice, or a CLIP-based choice without ``clip``.
        """
        if identity_network not in ("arcface", "clip"):
            raise UserError(f"identity_network must be 'arcface' or 'clip', got {identity_network!r}")
        if diversity_network not in ("lpips", "clip"):
            raise UserError(f"diversity_network must be 'lpips' or 'clip', got {diversity_network!r}")
        device = torch.device(device or "cpu")
        nets = cls(clip_templates=clip_templates)
        if inception_weights is not None:
            nets.inception = InceptionV3.from_pretrained(inception_weights, "torchvision", "IS / SIFID").to(device)
        if fid_inception_weights is not None:
            nets.fid_features = PoolFeatures(InceptionV3.from_pretrained(fid_inception_weights, "fid", "FID / KID")).to(device)
        if hed_weights is not None:
            nets.hed = HED.from_pretrained(hed_weights).to(device)
        if arcface_weights is not None and identity_network == "arcface":
            from .arcface import IRSE50

            nets.identity_features = ArcFaceFeatures(IRSE50.from_pretrained(arcface_weights)).to(device)
        if clip is not None:
            if isinstance(clip, (str, bytes)) or hasattr(clip, "__fspath__"):
                from ipl_diffusion.clip_text import CLIPPromptEncoder

                clip = CLIPPromptEncoder.from_pretrained(clip, device=device)
            nets.clip = clip
        if identity_network == "clip":
            if nets.clip is None:
                raise UserError("identity_network='clip' needs a CLIP model (clip=PATH or --clip-model PATH)")
            nets.identity_features = nets.clip.encode_images
            nets.identity_name = "CLIP image features (substitute for a domain recogniser)"
        if diversity_network == "clip":
            if nets.clip is None:
                raise UserError("diversity_network='clip' needs a CLIP model (clip=PATH or --clip-model PATH)")
            nets.diversity_distance = FeatureDistance(nets.clip.encode_images)
            nets.diversity_name = "CLIP image-feature distance (not LPIPS)"
        elif lpips_backbone_weights is not None:
            nets.diversity_distance = LPIPS.from_pretrained(lpips_backbone_weights, lpips_lin_weights, lpips_net).to(device)
            # Inputs come through ipl_diffusion.images ([-1, 1] by construction); a set of all-bright
            # images (a collapsed, all-white generator) must not be taken for [0, 1] images.
            nets.diversity_distance.check_range = False
            nets.diversity_name = f"LPIPS v0.1 ({lpips_net})"
        return nets


@dataclass
class EvaluationInputs:
    adapted: torch.Tensor
    source: torch.Tensor | None = None
    references: torch.Tensor | None = None
    reference_names: list[str] = field(default_factory=list)
    real: torch.Tensor | None = None
    cluster_centers: torch.Tensor | None = None
    source_label: str | None = None
    target_label: str | None = None


def missing_requirements(metric: str, inputs: EvaluationInputs, nets: MetricNetworks, splits: int = 5) -> str | None:
    """Why ``metric`` cannot run with these inputs / networks (``None`` if it can).

    Messages name the missing input and the ``ipl evaluate`` option that supplies it.
    """
    need = []
    if metric in ("is", "sifid") and nets.inception is None:
        need.append("the Inception-v3 weights (--inception-weights)")
    if metric == "sifid" and inputs.references is None:
        need.append("target-domain reference images (--reference)")
    if metric in ("scs", "id", "clip_direction") and inputs.source is None:
        need.append("paired source images (--source)")
    if metric == "scs" and nets.hed is None:
        need.append("the HED weights (--hed-weights)")
    if metric == "id" and nets.identity_features is None:
        need.append("the ArcFace IR-SE50 weights (--arcface-weights) or --identity-network clip")
    if metric in ("fid", "kid"):
        if nets.fid_features is None:
            need.append("the FID Inception weights (--fid-inception-weights)")
        if inputs.real is None:
            need.append("real target-domain images (--real)")
    if metric in ("clip_score", "clip_direction"):
        if nets.clip is None:
            need.append("a CLIP model (--clip-model)")
        if not inputs.target_label:
            need.append("the target label (--target-label)")
        if metric == "clip_direction" and not inputs.source_label:
            need.append("the source label (--source-label)")
    if metric in ("pairwise_lpips", "intra_lpips") and nets.diversity_distance is None:
        need.append("the LPIPS backbone weights (--lpips-backbone-weights) or --diversity-network clip")
    if metric == "intra_lpips" and inputs.cluster_centers is None and inputs.references is None:
        need.append("cluster centres (--cluster-centers or --reference)")
    if need:
        return "needs " + " and ".join(need)
    n = inputs.adapted.shape[0]
    if metric == "is" and n < splits:
        return f"needs at least --splits={splits} adapted images, got {n}"
    if metric in ("pairwise_lpips", "intra_lpips", "fid", "kid") and n < 2:
        return f"needs at least 2 adapted images, got {n}"
    if metric in ("fid", "kid") and inputs.real.shape[0] < 2:
        return f"needs at least 2 real images, got {inputs.real.shape[0]}"
    return None


def _row(metric, value, std=None, n=None, note=""):
    return {"metric": metric, "value": float(value), "std": None if std is None else float(std),
            "n": n, "higher_is_better": HIGHER_IS_BETTER[metric.split("[")[0]], "note": note}


def run_metric(metric: str, inputs: EvaluationInputs, nets: MetricNetworks, splits: int = 5, batch_size: int = 16,
               kid_subset_size: int = 1000, max_pairs: int | None = None, sifid_dims: int = 64,
               ) -> tuple[list[dict], dict]:
    """Compute one metric; returns ``(rows, per_image)``.

    ``rows`` are dicts ``{"metric", "value", "std", "n", "higher_is_better", "note"}``
    (SIFID gives one row per reference, ``sifid[<name>]``, plus their mean); ``per_image`` maps
    a column name to ``(N,)`` per-pair values where the metric has them.

    Raises:
        ValueError: a missing input / network (see :func:`missing_requirements`), or too few
            samples for the metric.
    """
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    reason = missing_requirements(metric, inputs, nets, splits)
    if reason:
        raise UserError(f"{metric}: {reason}")
    adapted, n = inputs.adapted, inputs.adapted.shape[0]
    if metric == "is":
        if n < splits:
            raise UserError(f"is: needs at least --splits={splits} adapted images, got {n}")
        mean, std = inception_score(adapted, nets.inception, splits=splits, batch_size=batch_size)
        note = f"{splits} splits, std over splits"
        if input_size(adapted) is not None:
            note += f"; resized to {input_size(adapted)} px (Inception needs >= {INCEPTION_MIN_SIZE})"
        return [_row("is", mean, std, n, note)], {}
    if metric == "sifid":
        rows, per_image = [], {}
        names = inputs.reference_names or [f"R{i + 1}" for i in range(inputs.references.shape[0])]
        for name, reference in zip(names, inputs.references):
            values = sifid(reference, adapted, nets.inception, dims=sifid_dims)
            rows.append(_row(f"sifid[{name}]", values.mean(), values.std() if n > 1 else None, n,
                             f"mean over adapted images, {sifid_dims}-ch features"))
            per_image[f"sifid[{name}]"] = values
        rows.append(_row("sifid", sum(r["value"] for r in rows) / len(rows), None, n,
                         f"mean over {len(names)} reference(s)"))
        return rows, per_image
    if metric == "scs":
        values = structural_consistency(inputs.source, adapted, nets.hed, batch_size=batch_size)
        return [_row("scs", values.mean(), values.std() if n > 1 else None, n, "mean over pairs")], {"scs": values}
    if metric == "id":
        values = identity_similarity(inputs.source, adapted, nets.identity_features, batch_size=batch_size)
        return [_row("id", values.mean(), values.std() if n > 1 else None, n,
                     f"mean over pairs; {nets.identity_name}")], {"id": values}
    if metric == "fid":
        return [_row("fid", fid(inputs.real, adapted, nets.fid_features, batch_size), None, n,
                     f"{inputs.real.shape[0]} real images")], {}
    if metric == "kid":
        mean, std = kid(inputs.real, adapted, nets.fid_features, subset_size=kid_subset_size, batch_size=batch_size)
        return [_row("kid", mean, std, n, "std over subsets")], {}
    if metric in ("clip_score", "clip_direction"):
        target = nets.clip.label_features(inputs.target_label, templates=nets.clip_templates)
        if metric == "clip_score":
            scores = clip_score(adapted, target, nets.clip.encode_images, batch_size)["clip_score"]
            return [_row("clip_score", scores.mean(), scores.std() if n > 1 else None, n,
                         f"100*max(cos,0) to '{inputs.target_label}'")], {"clip_score": scores}
        source_t = nets.clip.label_features(inputs.source_label, templates=nets.clip_templates)
        values = clip_directional_similarity(inputs.source, adapted, source_t, target, nets.clip.encode_images, batch_size)
        return [_row("clip_direction", values.mean(), values.std() if n > 1 else None, n,
                     f"'{inputs.source_label}' -> '{inputs.target_label}'")], {"clip_direction": values}
    if metric == "pairwise_lpips":
        if n < 2:
            raise UserError(f"pairwise_lpips: needs at least 2 adapted images, got {n}")
        value = mean_pairwise_distance(adapted, nets.diversity_distance, max_pairs=max_pairs, batch_size=batch_size)
        return [_row("pairwise_lpips", value, None, n, f"mean over pairs; {nets.diversity_name}")], {}
    centers = inputs.cluster_centers if inputs.cluster_centers is not None else inputs.references
    result = intra_cluster_distance(adapted, centers, nets.diversity_distance, max_pairs_per_cluster=max_pairs,
                                    batch_size=batch_size)
    used = sum(v is not None for v in result["per_cluster"])
    return [_row("intra_lpips", result["value"], None, n,
                 f"{used}/{centers.shape[0]} clusters with >= 2 images, sizes {result['sizes']}; "
                 f"{nets.diversity_name}")], {}


def evaluate(inputs: EvaluationInputs, nets: MetricNetworks, metrics="auto", **kwargs) -> dict:
    """Run ``metrics`` (a list of names, or ``"auto"``: every metric whose inputs and networks
    are present) and return ``{"rows": [...], "per_image": {...}, "skipped": {metric: reason}}``.

    Raises:
        ValueError: an explicitly requested metric cannot run (the message says what it needs),
            or ``"auto"`` finds nothing to compute.
    """
    skipped, splits = {}, kwargs.get("splits", 5)
    if metrics == "auto":
        chosen = []
        for metric in METRICS:
            reason = missing_requirements(metric, inputs, nets, splits)
            if reason:
                skipped[metric] = reason
            else:
                chosen.append(metric)
        if not chosen:
            raise UserError("nothing to evaluate: " + "; ".join(f"{m} {r}" for m, r in skipped.items()))
    else:
        chosen = list(metrics)
        unknown = [m for m in chosen if m not in METRICS]
        if unknown:
            raise UserError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
        problems = [f"{m} {r}" for m in chosen if (r := missing_requirements(m, inputs, nets, splits))]
        if problems:
            raise UserError("; ".join(problems))
    rows, per_image = [], {}
    for metric in chosen:
        metric_rows, metric_per_image = run_metric(metric, inputs, nets, **kwargs)
        rows += metric_rows
        per_image.update(metric_per_image)
    return {"rows": rows, "per_image": per_image, "skipped": skipped}
