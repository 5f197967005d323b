"""Inception-v3 layout, Inception Score and SIFID checked against hand computations."""

import math

import pytest
import torch

from ipl_diffusion.metrics import InceptionV3, frechet_distance, inception_score, inception_score_from_probs, sifid
from ipl_diffusion.metrics.sifid import location_statistics


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    model = InceptionV3("torchvision")
    # Random BN statistics so that the network is not close to the identity-ish init.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def test_torchvision_layout_matches_the_published_network(inception):
    # torchvision's inception_v3 (aux_logits=True) has exactly 27,161,264 parameters.
    assert sum(p.numel() for p in inception.parameters()) == 27_161_264
    keys = inception.state_dict()
    assert keys["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert keys["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert keys["AuxLogits.fc.weight"].shape == (1000, 768)
    fid = InceptionV3("fid").state_dict()
    assert fid["fc.weight"].shape == (1008, 2048) and not any(k.startswith("AuxLogits") for k in fid)


def test_from_pretrained_round_trip_and_old_files_without_num_batches_tracked(inception, tmp_path):
    state = {k: v for k, v in inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "inception_v3_google-0cc3c7bd.pth"
    torch.save(state, path)
    loaded = InceptionV3.from_pretrained(str(tmp_path))  # a folder holding the default file name
    x = torch.rand(1, 3, 80, 80) * 2 - 1
    torch.testing.assert_close(loaded(x), inception(x))
    torch.testing.assert_close(loaded.block0(x), inception.block0(x))


def test_fid_variant_loads_its_file_and_differs_only_in_pooling(inception, tmp_path):
    fid = InceptionV3("fid")
    shared = {k: v for k, v in inception.state_dict().items() if not k.startswith(("AuxLogits", "fc."))}
    fid.load_state_dict(shared, strict=False)
    torch.save(fid.state_dict(), tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    loaded = InceptionV3.from_pretrained(str(tmp_path), variant="fid")
    x = torch.rand(1, 3, 80, 80) * 2 - 1
    torch.testing.assert_close(loaded.block0(x), inception.block0(x))
    fid_features = loaded.pool_features(x)
    torch.testing.assert_close(fid_features, fid.pool_features(x))
    assert not torch.allclose(fid_features, inception.pool_features(x))  # pooling differs
    assert loaded.fc(fid_features).shape == (1, 1008)
    with pytest.raises(ValueError, match=r"torchvision ImageNet layout.*missing keys \['AuxLogits"):
        InceptionV3.from_pretrained(str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"), variant="torchvision")


def test_wrong_layout_is_a_clear_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not in the Inception-v3 .*missing keys"):
        InceptionV3.from_pretrained(str(path))


def test_inception_score_by_hand():
    # Four samples, each certain of a different class: p(y) uniform, KL = log 4 each -> IS = 4.
    assert inception_score_from_probs(torch.eye(4), splits=1) == pytest.approx((4.0, 0.0))
    # Identical predictions: KL = 0 -> IS = 1.
    assert inception_score_from_probs(torch.full((6, 3), 1 / 3), splits=2) == pytest.approx((1.0, 0.0))
    # Consecutive splits: first split has 2 distinct one-hots (IS 2), second 4 (IS 4) -> mean 3, np.std 1.
    probs = torch.cat([torch.eye(4)[[0, 1, 0, 1]], torch.eye(4)])
    assert inception_score_from_probs(probs, splits=2) == pytest.approx((3.0, 1.0))
    # A soft case computed with the written-out formula.
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=torch.float64)
    py = p.mean(0)
    kl = [sum(p[i, c] * math.log(p[i, c] / py[c]) for c in range(3)) for i in range(2)]
    assert inception_score_from_probs(p, splits=1)[0] == pytest.approx(math.exp(sum(kl) / 2))


def test_inception_score_on_images_uses_softmax_of_logits_without_resizing(inception):
    images = torch.rand(3, 3, 80, 80) * 2 - 1
    probs = torch.softmax(inception(images), 1)  # at 80 px: no resize, as RSSA's resize=False
    # batch_size=2 also checks that batches are concatenated in order
    assert inception_score(images, inception, splits=3, batch_size=2) == pytest.approx(
        inception_score_from_probs(probs, splits=3), rel=1e-5)
    with pytest.raises(ValueError, match="at least `splits`=5"):
        inception_score(images, inception, splits=5)


def test_frechet_distance_by_hand():
    # 1-D: (0 - 2)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 5
    assert frechet_distance(torch.zeros(1), torch.ones(1, 1), torch.full((1,), 2.0), torch.full((1, 1), 4.0)) == pytest.approx(5.0)
    # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    expected = 1 + 4 + ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected)


def test_location_statistics_treat_positions_as_samples():
    fmap = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [1.0, 1.0]]])  # (C=2, H=2, W=2)
    mu, sigma = location_statistics(fmap)
    torch.testing.assert_close(mu, torch.tensor([2.5, 0.5], dtype=torch.float64))
    rows = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [4.0, 1.0]], dtype=torch.float64)
    centred = rows - rows.mean(0)
    torch.testing.assert_close(sigma, centred.T @ centred / 3)  # unbiased, like np.cov


def test_sifid_against_manual_computation(inception):
    torch.manual_seed(1)
    reference = torch.rand(3, 40, 40) * 2 - 1
    images = torch.rand(2, 3, 48, 40) * 2 - 1
    values = sifid(reference, images, inception)
    assert values.shape == (2,)
    mu_r, s_r = location_statistics(inception.block0(reference[None])[0])
    for value, image in zip(values, images):
        mu, s = location_statistics(inception.block0(image[None])[0])
        assert value.item() == pytest.approx(frechet_distance(mu_r, s_r, mu, s))
    assert sifid(reference, reference[None], inception)[0].item() == pytest.approx(0.0, abs=1e-4)
    # dims=192: SinGAN's block 1 (before the second max pool)
    big = torch.rand(3, 96, 96) * 2 - 1
    mu_r, s_r = location_statistics(inception.block1(big[None])[0])
    mu, s = location_statistics(inception.block1(images[:1, :, :, :])[0])
    assert inception.block1(big[None]).shape[1] == 192
    assert sifid(big, images[:1], inception, dims=192)[0].item() == pytest.approx(frechet_distance(mu_r, s_r, mu, s))
    with pytest.raises(ValueError, match="64 or 192"):
        sifid(big, images, inception, dims=2048)
