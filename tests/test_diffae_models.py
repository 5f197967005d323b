"""DiffAE models (ipl_diffusion.models): upstream parameter counts, conditioning, save/load,
attention processors (xformers fallback), gradient checkpointing, dtype and size errors."""

import warnings

import pytest
import torch
from diffae_tiny import SIZE, Z, tiny_encoder, tiny_latent_net, tiny_unet
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from ipl_diffusion.models import DiffAEUNetModel, LatentNetModel, SemanticEncoder
from ipl_diffusion.models.diffae_blocks import DiffAEResBlock


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_default_configs_match_upstream_ffhq256_autoenc_parameter_counts():
    with torch.device("meta"):  # no memory for the 222 M parameters
        unet, encoder, latent = DiffAEUNetModel(), SemanticEncoder(), LatentNetModel()
    assert n_params(encoder) == 30_150_400  # "30.15 M"
    assert n_params(unet) == 138_341_891  # "138.34 M"
    assert n_params(unet) + n_params(encoder) == 168_492_291  # upstream autoencoder total
    assert n_params(latent) == 54_109_696  # "54.11 M"
    # upstream layout: 18 decoder blocks, 6 attention layers in the UNet, 3 in the encoder
    assert len(unet.up_blocks) == 18 and len(unet.down_blocks) == 17
    assert len(unet.attn_processors) == 6 and len(encoder.attn_processors) == 3
    assert len(encoder.down_blocks) == 20


def test_shapes_and_conditioning():
    unet, encoder = tiny_unet(), tiny_encoder()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    z = encoder(x)
    assert z.shape == (2, Z)
    eps = unet(x, torch.tensor([10, 500]), z).sample
    assert eps.shape == x.shape and eps.dtype == x.dtype
    # every input matters: z_sem, t, x
    assert not torch.allclose(eps, unet(x, torch.tensor([10, 500]), z.flip(0)).sample)
    assert not torch.allclose(eps, unet(x, torch.tensor([11, 500]), z).sample)
    # a scalar timestep broadcasts; return_dict=False gives a tuple
    assert torch.equal(unet(x, 7, z).sample, unet(x, torch.tensor([7, 7]), z, return_dict=False)[0])


def test_resblock_conditioning_order_is_time_then_z_sem():
    torch.manual_seed(0)
    block = DiffAEResBlock(4, 4, temb_channels=3, cond_channels=2).eval()
    torch.nn.init.normal_(block.conv2.weight)
    x, temb, cond = torch.randn(1, 4, 4, 4), torch.randn(1, 3), torch.randn(1, 2)
    h = block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x))))
    s_t, b_t = block.time_emb_proj(torch.nn.functional.silu(temb))[:, :, None, None].chunk(2, 1)
    s_z = block.cond_emb_proj(torch.nn.functional.silu(cond))[:, :, None, None]
    expected = x + block.conv2(torch.nn.functional.silu((h * (1 + s_t) + b_t) * (1 + s_z)))
    assert torch.allclose(block(x, temb, cond), expected, atol=1e-6)


def test_fresh_unet_is_zero_initialised_like_upstream():
    unet = DiffAEUNetModel(
        sample_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(4,), embed_channels=16, z_sem_channels=4,
    )
    assert unet(torch.randn(1, 3, 8, 8), 3, torch.randn(1, 4)).sample.abs().max() == 0


def test_save_load_round_trip(tmp_path):
    unet, encoder, latent = tiny_unet(), tiny_encoder(), tiny_latent_net()
    latent.set_statistics(torch.randn(10, Z) * 3 + 1)
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([3, 900])
    for model in (unet, encoder, latent):
        model.save_pretrained(tmp_path / type(model).__name__)
    unet2 = DiffAEUNetModel.from_pretrained(tmp_path / "DiffAEUNetModel")
    encoder2 = SemanticEncoder.from_pretrained(tmp_path / "SemanticEncoder")
    latent2 = LatentNetModel.from_pretrained(tmp_path / "LatentNetModel")
    assert (tmp_path / "DiffAEUNetModel" / "diffusion_pytorch_model.safetensors").exists()
    z = encoder(x)
    assert torch.equal(encoder2(x), z)
    assert torch.equal(unet2(x, t, z).sample, unet(x, t, z).sample)
    assert torch.equal(latent2(z, t), latent(z, t))
    assert torch.equal(latent2.conds_std, latent.conds_std)
    assert torch.allclose(latent2.denormalize(latent2.normalize(z)), z, atol=1e-5)


def test_attention_processors_agree():
    unet, encoder = tiny_unet(), tiny_encoder()
    x, z = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, Z)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    sdpa = unet(x, 5, z).sample
    unet.set_attn_processor(AttnProcessor())
    assert torch.allclose(unet(x, 5, z).sample, sdpa, atol=1e-6)
    encoder.set_attn_processor({name: AttnProcessor() for name in encoder.attn_processors})
    with pytest.raises(ValueError):
        encoder.set_attn_processor({"only.one": AttnProcessor()})


def test_xformers_unavailable_warns_once_and_falls_back_to_sdpa(monkeypatch):
    import ipl_diffusion.models.diffae_blocks as blocks

    monkeypatch.setattr(blocks, "xformers_unavailable_reason", lambda: "no GPU here")
    unet = tiny_unet()
    unet.set_attn_processor(AttnProcessor())
    x, z = torch.randn(1, 3, SIZE, SIZE), torch.randn(1, Z)
    reference = unet(x, 5, z).sample
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unet.enable_xformers_memory_efficient_attention()
    messages = [str(w.message) for w in caught if "xformers" in str(w.message)]
    assert len(messages) == 1 and "no GPU here" in messages[0] and "scaled_dot_product_attention" in messages[0]
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert torch.allclose(unet(x, 5, z).sample, reference, atol=1e-6)
    unet.disable_xformers_memory_efficient_attention()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the real CPU-only behaviour")
def test_real_cpu_machine_does_not_raise():
    encoder = tiny_encoder()
    with pytest.warns(UserWarning, match="xformers"):
        encoder.enable_xformers_memory_efficient_attention()
    assert encoder(torch.randn(1, 3, SIZE, SIZE)).shape == (1, Z)


def test_gradient_checkpointing_gives_same_gradients():
    x, z = torch.randn(2, 3, SIZE, SIZE), torch.randn(2, Z)
    grads = []
    for checkpointing in (False, True):
        unet = tiny_unet()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet(x, 3, z).sample.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    encoder = tiny_encoder()
    encoder.enable_gradient_checkpointing()
    encoder(x).sum().backward()
    assert encoder.conv_in.weight.grad is not None


def test_dtype_comes_from_the_model():
    x, z = torch.randn(1, 3, SIZE, SIZE), torch.randn(1, Z)
    reference = tiny_unet()(x, 4, z).sample
    unet = tiny_unet().to(torch.bfloat16)  # float32 inputs, bfloat16 weights
    out = unet(x, 4, z).sample
    assert out.dtype == torch.float32  # returned in the input's dtype, computed in the model's
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()
    encoder = tiny_encoder().to(torch.bfloat16)
    assert encoder(x).dtype == torch.float32


def test_bad_inputs_raise_clear_errors():
    unet, encoder = tiny_unet(), tiny_encoder()
    with pytest.raises(ValueError, match="divisible by its downsampling factor 2"):
        unet(torch.randn(1, 3, 15, 16), 1, torch.randn(1, Z))
    with pytest.raises(ValueError, match="divisible by its downsampling factor 4"):
        encoder(torch.randn(1, 3, 18, 18))
    with pytest.raises(ValueError, match="z_sem must have shape"):
        unet(torch.randn(2, 3, SIZE, SIZE), 1, torch.randn(1, Z))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encoder(torch.randn(1, 4, SIZE, SIZE))
    # other divisible sizes run (attention placement is fixed at construction)
    assert encoder(torch.randn(1, 3, 8, 8)).shape == (1, Z)


def test_latent_net_structure_and_normalisation():
    latent = tiny_latent_net()
    z = torch.randn(4, Z)
    assert latent(z, torch.tensor([0, 1, 2, 999])).shape == (4, Z)
    latent.set_statistics(torch.randn(100, Z) * 2 + 5)
    normalised = latent.normalize(torch.full((1, Z), 5.0))
    assert normalised.abs().max() < 1.0
    with pytest.raises(ValueError, match="at least 2"):
        latent.set_statistics(torch.randn(1, Z))
