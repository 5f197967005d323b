"""LPIPS, pairwise and intra-cluster (Ojha et al.) diversity, FID/KID: formulas by hand."""

import itertools

import pytest
import torch

from ipl_diffusion.metrics import LPIPS, FeatureDistance, assign_to_clusters, fid, frechet_distance, intra_cluster_distance, kid
from ipl_diffusion.metrics import mean_pairwise_distance
from ipl_diffusion.metrics.lpips import normalize_channels


def mean_distance(a, b):
    """A hand-checkable distance: |mean(a) - mean(b)| per pair."""
    return (a.mean(dim=(1, 2, 3)) - b.mean(dim=(1, 2, 3))).abs()


def constant_images(values, size=4):
    return torch.stack([torch.full((3, size, size), float(v)) for v in values])


def test_mean_pairwise_distance_by_hand():
    images = constant_images([0.0, 0.1, 0.3])
    # pairs: 0.1, 0.3, 0.2 -> 0.2
    assert mean_pairwise_distance(images, mean_distance, batch_size=2) == pytest.approx(0.2)
    one = mean_pairwise_distance(images, mean_distance, max_pairs=1)
    assert any(one == pytest.approx(v) for v in (0.1, 0.3, 0.2))
    with pytest.raises(ValueError, match="at least 2 images"):
        mean_pairwise_distance(images[:1], mean_distance)


def test_intra_cluster_distance_assigns_then_averages_within_clusters():
    images = constant_images([-0.9, -0.8, -0.5, 0.7, 0.6, 0.95, 0.0])
    centers = constant_images([-1.0, 1.0, 0.1])
    assignment = assign_to_clusters(images, centers, mean_distance, batch_size=5)
    assert assignment.tolist() == [0, 0, 0, 1, 1, 1, 2]
    result = intra_cluster_distance(images, centers, mean_distance)
    c0 = (0.1 + 0.4 + 0.3) / 3
    c1 = (0.1 + 0.25 + 0.35) / 3
    assert result["per_cluster"][0] == pytest.approx(c0)
    assert result["per_cluster"][1] == pytest.approx(c1)
    assert result["per_cluster"][2] is None and result["sizes"] == [3, 3, 1]
    assert result["value"] == pytest.approx((c0 + c1) / 2)
    # A collapsed generator (all images identical within clusters) scores 0.
    assert intra_cluster_distance(constant_images([0.5] * 4), centers, mean_distance)["value"] == 0.0
    with pytest.raises(ValueError, match="no cluster got 2 or more"):
        intra_cluster_distance(images[:2], constant_images([-0.9, -0.8]), mean_distance)


def test_feature_distance_on_embeddings_is_two_minus_two_cos():
    embed = lambda x: x.flatten(1)[:, :2]  # noqa: E731
    a = torch.zeros(2, 3, 2, 2)
    b = torch.zeros(2, 3, 2, 2)
    a[0, 0, 0, 0], a[0, 0, 0, 1] = 1.0, 0.0
    b[0, 0, 0, 0], b[0, 0, 0, 1] = 0.0, 1.0  # orthogonal -> 2
    a[1, 0, 0, 0], b[1, 0, 0, 0] = 1.0, 3.0  # parallel -> 0
    torch.testing.assert_close(FeatureDistance(embed)(a, b), torch.tensor([2.0, 0.0]), atol=1e-6, rtol=0)


def test_lpips_matches_the_written_out_formula():
    torch.manual_seed(0)
    model = LPIPS("alex")
    for k in range(5):
        getattr(model, f"lin{k}").model[1].weight.data.uniform_(0, 1)
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    fx, fy = model.stages(x), model.stages(y)
    assert [f.shape[1] for f in fx] == [64, 192, 384, 256, 256]
    expected = 0
    for k in range(5):
        d = (normalize_channels(fx[k]) - normalize_channels(fy[k])) ** 2
        w = getattr(model, f"lin{k}").model[1].weight.view(1, -1, 1, 1)
        expected = expected + (d * w).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(model(x, y), expected)
    torch.testing.assert_close(model(x, x), torch.zeros(2))
    # The scaling layer maps [-1, 1] images with LPIPS' constants.
    seen = {}
    handle = model.features[0].register_forward_pre_hook(lambda m, i: seen.setdefault("x", i[0]))
    model.stages(torch.zeros(1, 3, 64, 64))
    handle.remove()
    torch.testing.assert_close(seen["x"][0, :, 0, 0], torch.tensor([0.030 / 0.458, 0.088 / 0.448, 0.188 / 0.450]))


def test_lpips_from_pretrained_uses_torchvision_backbone_file_and_published_lins(tmp_path):
    pytest.importorskip("torchmetrics")
    torch.manual_seed(0)
    vgg = LPIPS("vgg")
    backbone = {f"features.{k}": v for k, v in vgg.features.state_dict().items()}
    backbone["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's file also holds the classifier
    torch.save(backbone, tmp_path / "vgg16-397923af.pth")
    loaded = LPIPS.from_pretrained(str(tmp_path), net="vgg")
    # LPIPS v0.1's calibrated weights (shipped by torchmetrics) are non-negative 1x1 convs.
    w = loaded.lin2.model[1].weight
    assert w.shape == (1, 256, 1, 1) and (w >= 0).all() and w.sum() > 0
    with pytest.raises(ValueError, match="LPIPS AlexNet backbone .*none were given"):
        LPIPS.from_pretrained(None)


def test_fid_and_kid_through_torchmetrics_match_hand_formulas():
    pytest.importorskip("torchmetrics")
    torch.manual_seed(0)

    class Flat(torch.nn.Module):
        num_features = 3

        def forward(self, x):
            return x.mean(dim=(2, 3))

    real = torch.rand(6, 3, 4, 4) * 2 - 1
    fake = torch.rand(5, 3, 4, 4)
    fr, ff = real.mean(dim=(2, 3)).double(), fake.mean(dim=(2, 3)).double()
    expected = frechet_distance(fr.mean(0), torch.cov(fr.T), ff.mean(0), torch.cov(ff.T))
    assert fid(real, fake, Flat(), batch_size=4) == pytest.approx(expected, rel=1e-4, abs=1e-6)

    # KID with one subset holding every sample: the unbiased polynomial-kernel MMD^2.
    def k(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3

    def off_diagonal_mean(m):
        n = m.shape[0]
        return (m.sum() - m.diag().sum()) / (n * (n - 1))

    fr5 = fr[:5]
    mean, _ = kid(real[:5], fake, Flat(), subsets=1, subset_size=5)
    expected_kid = off_diagonal_mean(k(fr5, fr5)) + off_diagonal_mean(k(ff, ff)) - 2 * k(fr5, ff).mean()
    assert mean == pytest.approx(expected_kid.item(), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid(real[:1], fake, Flat())


def test_shapes_oracle_features_as_a_diversity_network():
    """The Shapes benchmark's use: LPIPS-style diversity on the shipped Shapes oracle's features."""
    from ipl_diffusion.shapes.oracle import ShapesOracle

    torch.manual_seed(0)
    oracle = ShapesOracle(resolution=16, channels=(8, 8, 8), feature_dim=6).eval()
    distance = FeatureDistance(lambda x: oracle.predict(x)["features"])
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    feats = torch.nn.functional.normalize(oracle.predict(images)["features"], dim=1)
    expected = torch.stack([(feats[i] - feats[j]).square().sum() for i, j in itertools.combinations(range(3), 2)]).mean()
    assert mean_pairwise_distance(images, distance) == pytest.approx(expected.item(), rel=1e-5)
