"""Bad inputs that used to crash deep inside or pass silently get one clear error."""

import warnings

import pytest
import torch
from diffae_tiny import SIZE, Z, diffae_scheduler, tiny_encoder, tiny_unet

from ipl_diffusion.errors import UserError
from ipl_diffusion.pipelines.pipeline_diffae import DiffAEPipeline


@pytest.fixture(scope="module")
def diffae():
    pipe = DiffAEPipeline(semantic_encoder=tiny_encoder(), unet=tiny_unet(), scheduler=diffae_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------ DiffAE codes


def test_decode_refuses_nan_and_other_size_codes(diffae):
    z = torch.randn(2, Z)
    with pytest.raises(UserError, match=r"x_T must be \(B, 3, 16, 16\) for this 16-px model; got \(2, 3, 32, 32\)"):
        diffae.decode(z, torch.randn(2, 3, 2 * SIZE, 2 * SIZE), num_inference_steps=2)
    with pytest.raises(UserError, match="x_T contains NaN or infinite values"):
        diffae.decode(z, torch.full((2, 3, SIZE, SIZE), float("nan")), num_inference_steps=2)
    with pytest.raises(UserError, match="z_sem contains NaN"):
        diffae(z_sem=torch.full((2, Z), float("nan")), num_inference_steps=2, output_type="latent")
    with pytest.raises(UserError, match=r"x_T must be \(B, 3, 16, 16\)"):  # __call__ checks the same way
        diffae(z_sem=z, x_T=torch.randn(2, 3, 2 * SIZE, 2 * SIZE), num_inference_steps=2, output_type="latent")
    with pytest.raises(UserError, match=rf"z_sem must be \(B, {Z}\)"):
        diffae.decode(torch.randn(2, Z + 1), torch.randn(2, 3, SIZE, SIZE), num_inference_steps=2)


def test_decode_warns_when_x_T_is_not_gaussian_noise(diffae):
    z = torch.randn(2, Z)
    with pytest.warns(UserWarning, match=r"x_T has mean 0.5\d and std 0.2\d, far from the N\(0, I\) noise"):
        diffae.decode(z, torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), num_inference_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Gaussian noise, an encoded x_T and a partial x_t0: no warning
        diffae.decode(z, torch.randn(2, 3, SIZE, SIZE), num_inference_steps=2)
        diffae.decode(z, torch.rand(2, 3, SIZE, SIZE), num_inference_steps=2, start_timestep=200)
        diffae(torch.rand(2, 3, SIZE, SIZE) * 2 - 1, num_inference_steps=2, num_inversion_steps=2, output_type="latent")


def test_ipl_decode_and_image_tensors_are_checked(tiny_clip):
    from tiny_ipl import build_tiny_ipl_pipeline

    pipe = build_tiny_ipl_pipeline()
    z = torch.randn(1, pipe.semantic_encoder.config.z_sem_channels)
    with pytest.raises(UserError, match=r"x_t0 must be \(B, 3, 16, 16\)"):
        pipe.decode(z, torch.randn(1, 3, 32, 32), t0=200, num_inference_steps=2, unet=pipe.source_unet)
    with pytest.raises(UserError, match="x_t0 contains NaN"):
        pipe.decode(z, torch.full((1, 3, 16, 16), float("nan")), t0=200, num_inference_steps=2, unet=pipe.source_unet)
    # image tensors in [0, 255] or with NaN are refused, not translated into garbage
    with pytest.raises(ValueError, match=r"image tensors must be in \[-1, 1\]; got values in \[0, 255\]"):
        pipe.preprocess(torch.linspace(0, 255, 3 * 16 * 16).reshape(1, 3, 16, 16))
    with pytest.raises(ValueError, match="NaN or infinite"):
        pipe.preprocess(torch.full((1, 3, 16, 16), float("nan")))


# ------------------------------------------------------------------------------ metrics


def test_lpips_refuses_images_outside_minus_one_one_and_takes_grey():
    from ipl_diffusion.metrics import LPIPS

    torch.manual_seed(0)
    lpips = LPIPS("alex")
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)  # [0, 1] images
    with pytest.raises(UserError, match=r"LPIPS expects images in \[-1, 1\]; got only values in \[.*\], as \[0, 1\] images have.*2 \* x - 1"):
        lpips(x, y)
    with pytest.raises(UserError, match=r"LPIPS expects images in \[-1, 1\]; got values in \[.*, 25\d\]"):
        lpips(x * 255, y * 255)
    assert lpips(x * 2 - 1, y * 2 - 1).shape == (2,)  # the same pair, in range
    grey = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.allclose(lpips(grey, y * 2 - 1), lpips(grey.expand(-1, 3, -1, -1), y * 2 - 1))
    lpips.check_range = False  # for callers that guarantee the range themselves
    lpips(x, y)


def test_sifid_takes_grey_tensors_as_grey_files_load():
    from ipl_diffusion.metrics import InceptionV3, sifid

    torch.manual_seed(0)
    inception = InceptionV3().eval()
    reference, images = torch.rand(1, 24, 24) * 2 - 1, torch.rand(2, 1, 24, 24) * 2 - 1
    expected = sifid(reference.expand(3, -1, -1), images.expand(-1, 3, -1, -1), inception)
    assert torch.allclose(sifid(reference, images, inception), expected)


def test_inception_score_resizes_images_under_75_px():
    from ipl_diffusion.metrics import InceptionV3, inception_score
    from ipl_diffusion.metrics.inception_score import input_size

    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert input_size(images) == 299 and input_size(torch.zeros(1, 3, 96, 96)) is None
    mean, std = inception_score(images, InceptionV3().eval(), splits=2)
    assert 1.0 <= mean <= 2.0


# ------------------------------------------------------------------- model-config keys


@pytest.mark.parametrize("kind", ["stylegan2", "semantic_encoder", "unet", "latent_net", "mapper"])
def test_a_misspelt_model_config_key_is_refused_naming_the_nearest_valid_one(kind, tmp_path):
    import json

    from diffae_tiny import tiny_latent_net

    from ipl_diffusion.mapper import LatentMapper
    from ipl_diffusion.models import StyleGAN2Generator

    model, key, meant = {
        "stylegan2": (StyleGAN2Generator(size=32, style_dim=16, n_mlp=2, channel_max=8), "chanel_multiplier", "channel_multiplier"),
        "semantic_encoder": (tiny_encoder(), "chanel_mult", "channel_mult"),
        "unet": (tiny_unet(), "num_res_block", "num_res_blocks"),
        "latent_net": (tiny_latent_net(), "num_layer", "num_layers"),
        "mapper": (LatentMapper(latent_dim=8, ctx_dim=8, n_ctx=2), "n_ctxx", "n_ctx"),
    }[kind]
    model.save_pretrained(tmp_path)
    type(model).from_pretrained(str(tmp_path))  # as saved: loads
    config = json.loads((tmp_path / "config.json").read_text())
    config[key] = config.pop(meant)
    (tmp_path / "config.json").write_text(json.dumps(config))
    cls = type(model).__name__
    with pytest.raises(UserError, match=rf"{cls} config has an unknown key '{key}' \(did you mean '{meant}'\?\)"):
        type(model).from_pretrained(str(tmp_path))

