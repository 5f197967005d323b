"""LatentMapper (Eq. 2) and SharedPromptContext: shapes, the reference parameterisation, save/load."""

import math

import pytest
import torch

from ipl_diffusion import LatentMapper
from ipl_diffusion.mapper import EqualLinear, PixelNorm, SharedPromptContext


def small_mapper(**kwargs):
    torch.manual_seed(0)
    config = dict(latent_dim=16, n_ctx=3, ctx_dim=8, hidden_dim=24)
    config.update(kwargs)
    return LatentMapper(**config)


def test_public_import_and_default_config():
    mapper = LatentMapper()
    assert (mapper.config.latent_dim, mapper.config.n_ctx, mapper.config.ctx_dim, mapper.config.num_layers) == (512, 4, 512, 4)
    assert mapper.config.lr_mul == 0.01
    linears = [m for m in mapper.mapping if isinstance(m, EqualLinear)]
    assert isinstance(mapper.mapping[0], PixelNorm)
    assert [(l.in_features, l.out_features) for l in linears] == [(512, 512)] * 3 + [(512, 2048)]
    assert all(l.activate for l in linears)  # the reference activates the output layer too
    assert sorted(mapper.state_dict()) == sorted(f"mapping.{i}.{p}" for i in range(1, 5) for p in ("weight", "bias"))


def test_forward_shape_and_dtype():
    mapper = small_mapper()
    out = mapper(torch.randn(5, 16))
    assert out.shape == (5, 3, 8) and out.dtype == torch.float32


def test_forward_matches_hand_computation():
    mapper = small_mapper(num_layers=2)
    x = torch.randn(4, 16)
    h = x / torch.sqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)
    for layer in mapper.mapping[1:]:
        w = layer.weight * 0.01 / math.sqrt(layer.in_features)
        h = torch.nn.functional.leaky_relu(h @ w.t() + layer.bias * 0.01, 0.2) * math.sqrt(2)
    torch.testing.assert_close(mapper(x), h.view(4, 3, 8))


def test_equalised_lr_parameterisation():
    layer = EqualLinear(256, 128, lr_mul=0.01)
    # Stored weights are N(0, 1)/lr_mul; the effective weights are N(0, 1/in_features).
    assert abs(layer.weight.std().item() - 100.0) < 5.0
    effective = layer.weight * layer.scale
    assert abs(effective.std().item() - 1 / math.sqrt(256)) < 0.005
    assert torch.count_nonzero(layer.bias) == 0


def test_output_activation_can_be_switched_off():
    mapper = small_mapper(activate_output=False)
    assert not mapper.mapping[-1].activate and mapper.mapping[1].activate


def test_pixel_norm_makes_the_mapper_scale_invariant():
    mapper = small_mapper()
    x = torch.randn(3, 16)
    torch.testing.assert_close(mapper(x), mapper(7.5 * x), rtol=1e-5, atol=1e-5)


def test_seeded_reset_is_deterministic():
    a, b = small_mapper(), small_mapper()
    a.reset_parameters(torch.Generator().manual_seed(11))
    b.reset_parameters(torch.Generator().manual_seed(11))
    x = torch.randn(2, 16)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [torch.randn(16), torch.randn(2, 15), torch.randn(2, 18, 16), "w"])
def test_bad_input_shape_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"expects latents of shape \(B, 16\)"):
        small_mapper()(bad)


def test_bad_config_is_an_error():
    with pytest.raises(ValueError, match="n_ctx"):
        LatentMapper(n_ctx=0)


def test_save_pretrained_round_trip_in_safetensors(tmp_path):
    mapper = small_mapper()
    with torch.no_grad():  # make weights distinctive
        mapper.mapping[1].bias.add_(3.0)
    x = torch.randn(4, 16)
    expected = mapper(x)
    mapper.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = LatentMapper.from_pretrained(tmp_path)
    assert loaded.config.n_ctx == 3 and loaded.config.ctx_dim == 8 and loaded.config.hidden_dim == 24
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_reference_checkpoint_conversion(tmp_path):
    mapper = small_mapper()
    reference = {"m": {f"mapping.{k}": v.clone() for k, v in mapper.state_dict().items()}, "m_optim": {}}
    path = tmp_path / "mapper.pt"
    torch.save(reference, path)
    loaded = LatentMapper.from_reference_checkpoint(path, n_ctx=3, hidden_dim=24)
    x = torch.randn(2, 16)
    torch.testing.assert_close(loaded(x), mapper(x))
    torch.save({"m": {"something.else": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="not an IPL mapper checkpoint"):
        LatentMapper.from_reference_checkpoint(path)


def test_gradients_reach_every_mapper_parameter():
    mapper = small_mapper()
    mapper(torch.randn(4, 16)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mapper.parameters())


def test_shared_prompt_context(tmp_path):
    vectors = torch.randn(4, 8)
    context = SharedPromptContext.from_vectors(vectors, latent_dim=16)
    out = context(torch.randn(3, 16))
    assert out.shape == (3, 4, 8)
    torch.testing.assert_close(out[2], vectors)
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        context(torch.randn(3, 5))
    context.save_pretrained(tmp_path)
    torch.testing.assert_close(SharedPromptContext.from_pretrained(tmp_path).ctx, vectors)
