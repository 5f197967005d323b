"""Evaluation metrics for zero-shot generative model adaptation (IPL, CVPR 2023, Sec. 4.1 / Table 1).

| metric | module | definition follows | network (given by path / Hub id) |
|---|---|---|---|
| IS | ``inception_score`` | Salimans et al. 2016 as run by RSSA (splits=5, no resize) | Inception-v3, torchvision layout |
| SIFID | ``sifid`` | SinGAN ``SIFID/`` (64-ch block-0 features per location) | Inception-v3, torchvision layout |
| SCS | ``scs`` | RSSA / AIR ``scs_score.py`` (HED edges, 2<s,t>/(|s|^2+|t|^2)) | HED (sniklaus BSDS500) |
| ID | ``identity`` | pSp / DiffusionCLIP ``IDLoss`` crop + cosine | ArcFace IR-SE50, or any extractor |
| FID / KID | ``fid`` | torchmetrics with pytorch-fid's Inception | Inception-v3, pytorch-fid layout |
| CLIP score / directional | ``clip_metrics`` | NADA direction, template-averaged labels | any CLIP (transformers) |
| intra-cluster / pairwise LPIPS | ``diversity``, ``lpips`` | Ojha et al. 2021 (with cluster assignment) | LPIPS v0.1 alex/vgg, or any features |

All images are ``(N, 3, H, W)`` float tensors in ``[-1, 1]`` (load files with
``ipl_diffusion.images``). No network is ever downloaded implicitly (see ``metrics.weights``).
"""

from .arcface import IRSE50
from .clip_metrics import (
    clip_cosine_from_features,
    clip_directional_similarity,
    clip_encoders,
    clip_score,
    directional_similarity_from_features,
)
from .diversity import FeatureDistance, assign_to_clusters, intra_cluster_distance, mean_pairwise_distance
from .fid import PoolFeatures, fid, kid
from .hed import HED
from .identity import ArcFaceFeatures, identity_similarity
from .inception import InceptionV3
from .inception_score import inception_probs, inception_score, inception_score_from_probs
from .lpips import LPIPS
from .scs import edge_similarity, structural_consistency
from .sifid import frechet_distance, location_statistics, sifid
from .suite import METRICS, EvaluationInputs, MetricNetworks

__all__ = [
    "METRICS", "ArcFaceFeatures", "EvaluationInputs", "FeatureDistance", "MetricNetworks", "HED", "IRSE50", "InceptionV3", "LPIPS", "PoolFeatures",
    "assign_to_clusters", "clip_cosine_from_features", "clip_directional_similarity", "clip_encoders", "clip_score",
    "directional_similarity_from_features", "edge_similarity", "fid", "frechet_distance", "identity_similarity",
    "inception_probs", "inception_score", "inception_score_from_probs", "intra_cluster_distance", "kid",
    "location_statistics", "mean_pairwise_distance", "sifid", "structural_consistency",
]
