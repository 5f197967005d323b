"""Losses (Eq. 3-5, 7-9, NADA) against hand computations on small tensors."""

import math

import pytest
import torch

from ipl_diffusion.losses import (
    adaptive_directional_loss,
    contrastive_loss,
    directional_domain_regularization_loss,
    directional_loss,
    domain_regularization_loss,
)

R = 1 / math.sqrt(2)


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- contrastive (Eq. 3-4)
def test_contrastive_infonce_by_hand():
    image = t([[1, 0], [3, 3]])  # normalised: [1, 0], [R, R]
    text = t([[5, 0], [0, 0.5]])  # normalised: [1, 0], [0, 1]
    # Sim = [[1, 0], [R, R]]; with logit scale 1:
    image_side = (math.log(1 + math.exp(-1)) + math.log(2)) / 2  # rows of Sim, targets 0 and 1
    text_side = (math.log(1 + math.exp(R - 1)) + math.log(1 + math.exp(-R))) / 2  # rows of Sim^T
    expected = (image_side + text_side) / 2
    got = contrastive_loss(image, text, logit_scale=1.0)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert contrastive_loss(image, text).item() == pytest.approx(  # default form/scale: infonce, 100
        contrastive_loss(image, text, logit_scale=torch.tensor(100.0, dtype=torch.float64), form="infonce").item()
    )


def test_contrastive_paper_form_by_hand():
    image = t([[1, 0], [3, 3]])
    text = t([[5, 0], [0, 0.5]])
    # Σ_{i≠j} Sim_ij - Σ_i Sim_ii = (0 + R) - (1 + R) = -1
    assert contrastive_loss(image, text, form="paper").item() == pytest.approx(-1.0, abs=1e-12)
    # Three orthogonal perfect pairs: 0 - 3.
    assert contrastive_loss(torch.eye(3), 2 * torch.eye(3), form="paper").item() == pytest.approx(-3.0)


def test_contrastive_infonce_prefers_matched_pairs():
    image = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    matched = contrastive_loss(image, image * 3)
    shuffled = contrastive_loss(image, image.roll(1, dims=0) * 3)
    assert matched < shuffled


def test_contrastive_errors():
    with pytest.raises(ValueError, match="one prompt per image"):
        contrastive_loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="feature size"):
        contrastive_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="Unknown contrastive loss form"):
        contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), form="sum")
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        contrastive_loss(torch.randn(4), torch.randn(4))


# ---------------------------------------------------------------- domain regularisation (Eq. 5)
def test_domain_regularization_by_hand():
    prompts = t([[1, 0], [0, 2], [-4, -4]])
    label = t([3, 3])
    expected = ((1 - R) + (1 - R) + (1 - (-1))) / 3
    assert domain_regularization_loss(prompts, label).item() == pytest.approx(expected, abs=1e-12)
    assert domain_regularization_loss(prompts, label[None]).item() == pytest.approx(expected, abs=1e-12)


def test_domain_regularization_is_scale_invariant_and_differentiable():
    prompts = torch.randn(4, 5, requires_grad=True)
    label = torch.randn(5)
    loss = domain_regularization_loss(prompts, label)
    torch.testing.assert_close(loss, domain_regularization_loss(prompts * 10, label / 3))
    loss.backward()
    assert prompts.grad.abs().sum() > 0


def test_domain_regularization_errors():
    with pytest.raises(ValueError, match=r"label_features must be a float tensor of shape \(D,\)"):
        domain_regularization_loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="feature size"):
        domain_regularization_loss(torch.randn(3, 4), torch.randn(5))


# ---------------------------------------------------------------- the direction regulariser (not in the paper)
def test_directional_domain_regularization_by_hand():
    source = t([[2, 0], [0, 1]])  # normalised: [1, 0], [0, 1]
    target = t([[0, 3], [1, 1]])  # normalised: [0, 1], [R, R]
    labels = t([1, 0]), t([0, 1])  # ΔY = [-1, 1]
    # ΔT_1 = [-1, 1]: cos 1. ΔT_2 = [R, R - 1]: cos = -1 / (sqrt(2) |ΔT_2|), |ΔT_2|^2 = 2 - 2R.
    cos_2 = -1 / (math.sqrt(2) * math.sqrt(2 - 2 * R))
    expected = ((1 - 1) + (1 - cos_2)) / 2
    got = directional_domain_regularization_loss(source, target, *labels)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert directional_domain_regularization_loss(source, target, labels[0][None], labels[1][None]).item() == pytest.approx(expected, abs=1e-12)


def _optimised_target_prompts(loss_of, start, steps=300):
    target = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([target], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of(target).backward()
        optimizer.step()
    return target.detach()


def test_direction_regulariser_keeps_each_images_content_where_eq5_collapses_it():
    """Why the option exists: Eq. 5 pulls every target prompt onto the target label's feature,
    so the content the label carries replaces each image's; the direction regulariser is
    minimised by moving each prompt along the label direction from where it is."""
    gen = torch.Generator().manual_seed(0)
    y_s, y_t = torch.randn(8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    # Source prompts spread around the source label, as Eq. 4 leaves them (each image's content).
    noise = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    source = torch.nn.functional.normalize(y_s / y_s.norm() + 0.6 * noise / noise.norm(dim=-1, keepdim=True), dim=-1)

    def spread(x):  # mean pairwise cosine
        x = torch.nn.functional.normalize(x, dim=-1)
        cos = x @ x.T
        return float((cos.sum() - cos.diagonal().sum()) / (len(x) * (len(x) - 1)))

    # Both start a little along the label direction from each source prompt (ΔT_i = 0 has no direction).
    start = source + 0.3 * (y_t / y_t.norm() - y_s / y_s.norm())
    eq5 = _optimised_target_prompts(lambda tt: domain_regularization_loss(tt, y_t), start)
    direction = _optimised_target_prompts(lambda tt: directional_domain_regularization_loss(source, tt, y_s, y_t), start)
    assert spread(eq5) > 0.99  # every prompt is the label
    assert directional_domain_regularization_loss(source, direction, y_s, y_t).item() < 1e-3
    assert spread(direction) < 0.9 and spread(direction) == pytest.approx(spread(source + (y_t / y_t.norm() - y_s / y_s.norm())), abs=0.2)


def test_directional_domain_regularization_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        directional_domain_regularization_loss(torch.randn(3, 4), torch.randn(2, 4), torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="feature size"):
        directional_domain_regularization_loss(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5), torch.randn(4))
    label = torch.randn(4)
    with pytest.raises(ValueError, match="same direction"):
        directional_domain_regularization_loss(torch.randn(3, 4), torch.randn(3, 4), label, 2 * label)


# ---------------------------------------------------------------- adaptive directional (Eq. 7-9)
def test_adaptive_directional_by_hand():
    source_image = t([[1, 0], [1, 0]])
    target_image = t([[0, 2], [0, 2]])  # ΔI = [-1, 1] for both pairs
    source_text = t([[1, 0], [1, 0]])
    target_text = t([[1, 1], [2, -2]])
    # Pair 1: ΔT = [R - 1, R]   -> angle to ΔI is 22.5 degrees.
    # Pair 2: ΔT = [R - 1, -R]  -> cos = ((1 - R) - R) / (sqrt 2 · |ΔT|).
    norm_dt = math.sqrt((R - 1) ** 2 + R**2)
    cos1 = ((1 - R) + R) / (math.sqrt(2) * norm_dt)
    cos2 = ((1 - R) - R) / (math.sqrt(2) * norm_dt)
    assert cos1 == pytest.approx(math.cos(math.pi / 8))
    expected = ((1 - cos1) + (1 - cos2)) / 2
    got = adaptive_directional_loss(source_image, target_image, source_text, target_text)
    assert got.item() == pytest.approx(expected, abs=1e-12)


def test_adaptive_directional_uses_per_pair_directions():
    g = torch.Generator().manual_seed(0)
    si, ti, st, tt = (torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(4))

    def unit(v):
        return v / math.sqrt(float(v @ v))

    # Eq. 7-9 written out pair by pair.
    per_pair = []
    for i in range(3):
        d_i, d_t = unit(ti[i]) - unit(si[i]), unit(tt[i]) - unit(st[i])
        per_pair.append(1 - float(d_i @ d_t) / math.sqrt(float(d_i @ d_i) * float(d_t @ d_t)))
    got = adaptive_directional_loss(si, ti, st, tt)
    assert got.item() == pytest.approx(sum(per_pair) / 3, abs=1e-12)
    # Images moved exactly along their own text directions (on the unit sphere): zero loss.
    cos = torch.tensor(0.8, dtype=torch.float64)
    s_unit = torch.eye(6, dtype=torch.float64)[:3]
    t_unit = cos * s_unit + (1 - cos**2).sqrt() * torch.eye(6, dtype=torch.float64)[3:]
    assert adaptive_directional_loss(2 * s_unit, 3 * t_unit, s_unit, t_unit).item() == pytest.approx(0, abs=1e-12)
    # Giving each pair another pair's direction makes it worse.
    assert adaptive_directional_loss(2 * s_unit, 3 * t_unit, s_unit, t_unit.roll(1, 0)).item() > 0.5


def test_adaptive_directional_shape_errors():
    a = torch.randn(2, 4)
    with pytest.raises(ValueError, match="target_text_features has 3 rows"):
        adaptive_directional_loss(a, a, a, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"target_text_features must be a float tensor of shape \(n, D\)"):
        adaptive_directional_loss(a, a, a, torch.randn(4))


def test_zero_image_direction_gives_loss_one_and_a_finite_gradient_along_the_text_direction():
    source_image = t([[1, 0, 0]])
    target_image = source_image.clone().requires_grad_(True)  # G_t == G_s: ΔI = 0
    source_text, target_text = t([[1, 0, 0]]), t([[0, 1, 0]])
    loss = adaptive_directional_loss(source_image, target_image, source_text, target_text)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    grad = target_image.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    delta_t = t([[-R, R, 0]])
    assert (grad * delta_t).sum() < 0  # a descent step moves the image along ΔT
    shared = directional_loss(source_image, source_image.clone(), source_text[0], target_text[0])
    assert shared.item() == pytest.approx(1.0)


# ---------------------------------------------------------------- NADA directional
def test_directional_loss_equals_adaptive_with_repeated_text_features():
    g = torch.Generator().manual_seed(1)
    source_image, target_image = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    source_text, target_text = torch.randn(6, generator=g), torch.randn(6, generator=g)
    shared = directional_loss(source_image, target_image, source_text, target_text)
    repeated = adaptive_directional_loss(source_image, target_image, source_text.expand(4, 6), target_text.expand(4, 6))
    torch.testing.assert_close(shared, repeated)
    torch.testing.assert_close(shared, directional_loss(source_image, target_image, source_text[None], target_text[None]))


def test_directional_loss_by_hand():
    source_image = t([[2, 0]])
    target_image = t([[0, 5]])  # ΔI ∝ [-1, 1]
    loss = directional_loss(source_image, target_image, t([0, 1]), t([1, 0]))  # ΔT ∝ [1, -1]: opposite
    assert loss.item() == pytest.approx(2.0)
    loss = directional_loss(source_image, target_image, t([1, 0]), t([0, 1]))  # aligned
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_directional_loss_errors():
    with pytest.raises(ValueError, match="same number of rows"):
        directional_loss(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match=r"source_text_features must be a float tensor of shape \(D,\)"):
        directional_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), torch.randn(4))
