"""The shipped Shapes models load through the real loading path and do their job.

These read the folders in ``ipl_diffusion/shapes_models`` (package data) with
``from_pretrained``; nothing is downloaded. Accuracy checks use a few fresh images, so they
are sanity checks of the shipped weights, not the full evaluations recorded in each folder's
``training_record.json``.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from ipl_diffusion.shapes import MODELS_DIR, STYLES, ShapesRenderer, default_model_path

FRESH_SEED = 55_555  # never drawn by the training scripts' evaluation seeds


def test_default_model_path_errors():
    with pytest.raises(ValueError, match="known: diffae"):
        default_model_path("vae")


def test_shipped_weights_fit_the_size_budget():
    total = sum(p.stat().st_size for p in MODELS_DIR.rglob("*") if p.is_file())
    assert total <= 40 * 1024 * 1024, f"shapes_models is {total / 2**20:.1f} MiB > 40 MiB"
    assert not list(MODELS_DIR.rglob("*.bin")) and not list(MODELS_DIR.rglob("*.pt")), "ship safetensors only"


def test_shapes_clip_loads_and_classifies_fresh_images():
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from ipl_diffusion.shapes.vocab import zero_shot_texts

    folder = default_model_path("clip")
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    processor = CLIPImageProcessor.from_pretrained(folder)
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.unk_token_id != tokenizer.eos_token_id
    assert model.config.vision_config.image_size == processor.crop_size["height"] == 32
    record = json.loads((folder / "training_record.json").read_text())
    assert set(record["zero_shot_accuracy"]) >= {"style", "color", "shape"}

    images, factors = ShapesRenderer(32).sample(60, seed=FRESH_SEED)
    with torch.no_grad():
        feats = F.normalize(model.get_image_features(pixel_values=images).pooler_output, dim=-1)
        for factor, floor in (("style", 0.9), ("color", 0.9), ("shape", 0.5)):
            tokens = tokenizer(zero_shot_texts(factor), padding=True, return_tensors="pt")
            text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
            acc = ((feats @ text.t()).argmax(1) == getattr(factors, factor)).float().mean().item()
            assert acc >= floor, f"{factor} zero-shot accuracy {acc:.2f} < {floor}"


def test_shapes_oracle_loads_and_reads_fresh_images():
    from ipl_diffusion.shapes.oracle import ShapesOracle

    oracle = ShapesOracle.from_pretrained(default_model_path("oracle")).eval()
    images, factors = ShapesRenderer(32).sample(80, seed=FRESH_SEED + 1)
    pred = oracle.predict(images)
    for key in ("style", "shape", "color"):
        acc = (pred[key] == getattr(factors, key)).float().mean().item()
        assert acc >= 0.9, f"oracle {key} accuracy {acc:.2f}"
    assert (pred["position"] - factors.position).abs().mean() * 32 < 1.5
    assert list(oracle.config.styles) == list(STYLES)


def test_shapes_diffae_parts_load_and_reconstruct():
    from ipl_diffusion.ddim import ddim_decode, ddim_invert
    from pipelines.pipeline_diffae import DiffAEPipeline

    pipe = DiffAEPipeline.from_pretrained(str(default_model_path("diffae-parts")))
    images, _ = ShapesRenderer(32).sample(4, seed=FRESH_SEED + 2, style="photo")
    with torch.no_grad():
        z_sem = pipe.semantic_encoder(images)
        x_T = ddim_invert(pipe.unet, images, z_sem, pipe.scheduler, 20)
        recon = ddim_decode(pipe.unet, x_T, z_sem, pipe.scheduler, 20)
    assert z_sem.shape == (4, pipe.unet.config.z_sem_channels)
    assert F.mse_loss(recon, images) < 0.01
    assert pipe.latent_net is not None and float(pipe.latent_net.conds_std.min()) > 0


def test_shipped_diff_ipl_pipeline_loads_offline_and_translates(monkeypatch):
    from pipelines.pipeline_ipl import IPLPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = IPLPipeline.from_pretrained(str(default_model_path("diffae")))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.source_label == "photo" and not pipe.is_adapted
    assert pipe.text_encoder.config.text_config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.latent_net is not None
    images, _ = ShapesRenderer(32).sample(2, seed=FRESH_SEED + 3, style="photo")
    out = pipe(images, t0=300, num_inversion_steps=6, num_inference_steps=6, output_type="pt").images
    assert out.shape == (2, 3, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
    # The unadapted round trip stays close to its input.
    assert F.mse_loss(out * 2 - 1, images) < 0.02


def test_shipped_pipeline_records_the_domains_its_clip_knows():
    import json

    from ipl_diffusion.shapes import default_model_path, known_domains

    index = json.loads((default_model_path("diffae") / "model_index.json").read_text())
    assert index["known_domains"] == list(known_domains())
