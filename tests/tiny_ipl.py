"""A tiny randomly initialised Diff-IPL source pipeline (DiffAE + CLIP), built in code.

16x16 images, ``z_sem`` of width 32 (matching the tiny CLIP's text width for the mapper
input), a 3-layer latent net. ``conv_out`` of the UNet is zero-initialised upstream; we give
it small random weights so eps depends on the input, as in a trained model.
"""

import torch
from diffusers import DDIMScheduler
from transformers import CLIPImageProcessor

from tiny_clip import build_clip, build_tokenizer

SIZE = 16
Z_DIM = 32


def build_tiny_ipl_pipeline(seed=0):
    from ipl_diffusion.models import DiffAEUNetModel, LatentNetModel, SemanticEncoder
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline

    torch.manual_seed(seed)
    common = dict(sample_size=SIZE, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,))
    encoder = SemanticEncoder(z_sem_channels=Z_DIM, **common).eval()
    unet = DiffAEUNetModel(embed_channels=64, z_sem_channels=Z_DIM, **common).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    latent_net = LatentNetModel(
        num_channels=Z_DIM, num_hid_channels=64, num_layers=3, skip_layers=(1, 2), num_time_emb_channels=16
    ).eval()
    scheduler = DDIMScheduler(
        beta_schedule="linear", clip_sample=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading"
    )
    latent_scheduler = DDIMScheduler(num_train_timesteps=1000, trained_betas=[0.008] * 1000, clip_sample=False)
    # 64 positions: CLIP's ImageNet templates ("a photo of the hard to see {}.") must fit.
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 64
    clip, tokenizer = build_clip(tokenizer, image_size=32, seed=seed, max_position_embeddings=64)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return IPLPipeline(
        semantic_encoder=encoder,
        source_unet=unet,
        scheduler=scheduler,
        text_encoder=clip,
        tokenizer=tokenizer,
        latent_net=latent_net,
        latent_scheduler=latent_scheduler,
        feature_extractor=processor,
        source_label="photo",
        base_model="tiny-random-diffae",
    )


# Options that make adapt() take seconds on a CPU.
FAST = dict(
    stage1_iterations=2,
    stage1_batch_size=4,
    t0=200,
    num_inversion_steps=4,
    num_train_steps=2,
    num_inference_steps=3,
    iterations=2,
    batch_size=2,
    learning_rate=1e-3,
    progress=False,
)


# `ipl adapt` / training-script flags that make a run on this pipeline take about a second.
FAST_CLI_ARGS = [
    "--stage1-iterations", "2", "--iterations", "1", "--batch-size", "2", "--t0", "200",
    "--num_inversion_steps", "3", "--num_train_steps", "2", "--num_inference_steps", "3", "--num_images", "4",
    "--learning_rate", "1e-3", "--device", "cpu",
]
