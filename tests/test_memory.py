"""The run's peak memory in run_config.json, and the low_memory preset (both backends)."""

import pytest
import torch
from transformers import CLIPImageProcessor

from ipl_diffusion.configs import DiffAEStage2Config, GANStage2Config
from tiny_ipl import FAST, SIZE, build_tiny_ipl_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny latency-bound models (conftest.py)

IMAGES = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def all_saved_bytes(step):
    """Bytes of every tensor autograd saves during ``step()``, whether or not alive at once:
    an upper bound of the peak, computed without the library's meter."""
    total = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.numel() * t.element_size()) or t, lambda t: t):
        step()
    return sum(total)


def test_run_config_records_the_peak_of_saved_activations_on_cpu():
    from ipl_diffusion.adaptation.diffae import encode_sources
    from ipl_diffusion.adaptation.diffae_trainer import DiffAEStage2Trainer
    from ipl_diffusion.clip_image import clip_image_features

    pipe = build_tiny_ipl_pipeline()
    adapted = pipe.adapt("sketch", images=IMAGES, **FAST)
    memory = adapted.adaptation_config["memory"]
    assert memory["device"] == "cpu" and "autograd-saved" in memory["measure"]
    # The same step measured independently: the peak is positive and at most all it saves.
    cache = encode_sources(pipe.semantic_encoder, pipe.source_unet, pipe.scheduler, IMAGES, FAST["t0"],
                           FAST["num_inversion_steps"], progress=False)
    config = DiffAEStage2Config(**{k: v for k, v in FAST.items() if k in DiffAEStage2Config.__dataclass_fields__})
    d = pipe.text_encoder.config.projection_dim
    trainer = DiffAEStage2Trainer(pipe.source_unet, pipe.scheduler, cache, torch.randn(4, d), torch.randn(4, d),
                                  clip_image_features(pipe.text_encoder, pipe.feature_extractor), config)
    upper = all_saved_bytes(lambda: trainer.step_on([0, 1][: config.batch_size]))
    assert 0 < memory["peak_bytes"] <= upper
    assert memory["peak_mib"] == pytest.approx(memory["peak_bytes"] / 2**20, abs=0.01)


def test_low_memory_preset_checkpoints_the_chain_same_weights_less_memory():
    pipe = build_tiny_ipl_pipeline()
    plain = pipe.adapt("sketch", images=IMAGES, **FAST)
    low = pipe.adapt("sketch", images=IMAGES, low_memory=True, **FAST)
    assert low.adaptation_config["stage2"]["gradient_checkpointing"] is True
    assert plain.adaptation_config["stage2"]["gradient_checkpointing"] is False
    # Checkpointing recomputes the same activations: the same update, less saved memory.
    for (name, a), b in zip(plain.unet.state_dict().items(), low.unet.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert low.adaptation_config["memory"]["peak_bytes"] < 0.5 * plain.adaptation_config["memory"]["peak_bytes"]


def test_low_memory_preset_leaves_explicit_options_and_chunks_the_gan_probes(tiny_clip):
    from ipl_diffusion.models.stylegan2 import StyleGAN2Generator
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    assert DiffAEStage2Config(low_memory=True, gradient_mode="per_step").gradient_mode == "per_step"
    assert GANStage2Config(low_memory=True).auto_layer_chunk == 2
    assert GANStage2Config(low_memory=True, auto_layer_chunk=4).auto_layer_chunk == 4
    torch.manual_seed(0)
    clip, tokenizer = tiny_clip
    gan = StyleGANIPLPipeline.from_components(StyleGAN2Generator(size=32, style_dim=16, n_mlp=2, channel_max=8).eval(),
                                              clip, tokenizer, CLIPImageProcessor(), source_label="photo")
    adapted = gan.adapt("sketch", low_memory=True, stage1_num_images=4, stage1_iterations=1, stage1_batch_size=4,
                        iterations=1, auto_layer_batch=4, num_sample_images=2, label_templates="single", progress=False)
    config = adapted.adaptation_config
    assert config["stage2"]["auto_layer_chunk"] == 2 and config["memory"]["peak_bytes"] > 0


def test_a_resumed_run_keeps_the_peak_its_checkpoint_recorded(tmp_path, monkeypatch):
    """Resuming a finished run trains nothing; it used to record a peak of 0 bytes."""
    pipe = build_tiny_ipl_pipeline()
    options = dict(FAST, output_dir=str(tmp_path), checkpointing_steps=1)
    first = pipe.adapt("sketch", images=IMAGES, **options).adaptation_config["memory"]
    assert first["peak_bytes"] > 0
    again = pipe.adapt("sketch", images=IMAGES, resume_from_checkpoint="latest", **options)
    assert again.adaptation_config["memory"] == first
    # a checkpoint from before the report: nothing measured, so no number rather than 0
    from ipl_diffusion import checkpointing

    load = checkpointing.load_checkpoint

    def as_before_the_report(*args, **kwargs):
        step, saved = load(*args, **kwargs)
        return step, {k: v for k, v in saved.items() if k != "memory"}

    monkeypatch.setattr(checkpointing, "load_checkpoint", as_before_the_report)
    older = pipe.adapt("sketch", images=IMAGES, resume_from_checkpoint="latest", **options)
    assert "memory" not in older.adaptation_config
