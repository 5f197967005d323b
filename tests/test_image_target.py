"""Image-defined targets (``target_images=``, ``ipl adapt --target_images``): NADA's img2img
direction, Eq. 5's anchor, Stage 2's per-image directions, both backends with and without a
label, and the refusals of bad style images."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPImageProcessor

from ipl_diffusion.adaptation import image_target
from ipl_diffusion.clip_image import preprocess_images
from ipl_diffusion.errors import UserError
from tiny_ipl import FAST, build_tiny_ipl_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny latency-bound models (conftest.py)

GAN_FAST = dict(stage1_num_images=8, stage1_iterations=2, stage1_batch_size=4, iterations=2, auto_layer_batch=2,
                num_sample_images=3, label_templates="single", img2img_batch=4, progress=False)


def _style_images(n=3, size=16, seed=1):
    """``n`` random images in ``[-1, 1]``: a "style" the tiny CLIP sees as unlike the sources."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _write_folder(folder, images):
    folder.mkdir()
    for i, x in enumerate(images):
        array = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"style_{i}.png")
    return folder


def _clip_unit_features(clip, processor, images):
    """Independent E_I: CLIP's get_image_features on the processor's normalisation, unit rows."""
    pixels = preprocess_images(images.float(), clip.config.vision_config.image_size, processor.image_mean,
                               processor.image_std, "bicubic")
    with torch.no_grad():
        return F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)


def test_img2img_direction_matches_nada_formula(tiny_clip):
    """d = Norm(mean Norm(E_I(style)) - mean Norm(E_I(source))) (NADA compute_img2img_direction),
    checked against numpy on CLIP's own get_image_features."""
    from ipl_diffusion.clip_image import clip_image_features

    clip, _ = tiny_clip
    processor = CLIPImageProcessor()
    style, sources = _style_images(3, 24), _style_images(5, 32, seed=2) * 0.2
    features = clip_image_features(clip, processor)
    goal = image_target.make_image_target(features, style, features(sources).detach())
    s = _clip_unit_features(clip, processor, style).numpy().astype(np.float64)
    r = _clip_unit_features(clip, processor, sources).numpy().astype(np.float64)
    expected = s.mean(0) - r.mean(0)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(goal.direction.numpy(), expected, atol=1e-5)
    assert goal.count == 3 and goal.num_sources == 5
    with pytest.raises(UserError, match="define no direction"):
        image_target.img2img_direction(torch.ones(2, 8), torch.ones(3, 8) * 5)


def test_stage2_directions_are_d_plus_each_images_deviation():
    """ΔT_i^img = d + (u_i - ū), handed to the trainers as -/+ ΔT/2 (Eq. 8 of the pair gives
    its direction); a shared-prompt scheme gets d exactly."""
    g = torch.Generator().manual_seed(0)
    src, tgt, d = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), F.normalize(torch.randn(8, generator=g), dim=0)
    u = F.normalize(F.normalize(tgt, dim=-1) - F.normalize(src, dim=-1), dim=-1)
    expected = d + u - u.mean(0)
    s2, t2 = image_target.image_target_features(src, tgt, d, image_target.shared_direction(src, tgt))
    got = F.normalize(t2, dim=-1) - F.normalize(s2, dim=-1)
    assert torch.allclose(F.normalize(got, dim=-1), F.normalize(expected, dim=-1), atol=1e-6)
    s2, t2 = image_target.image_target_features(src, tgt, d, None)
    assert torch.allclose(F.normalize(F.normalize(t2, dim=-1) - F.normalize(s2, dim=-1), dim=-1), d.expand(5, -1), atol=1e-6)


def test_domain_anchor_is_the_source_label_moved_by_the_image_displacement():
    """Eq. 5's anchor: Norm(E_T(Y_s)) + (style mean - source mean); with a label, Norm(E_T(Y_t)) + Norm(that)."""
    table = {"photo": torch.tensor([3.0, 0.0, 0.0]), "sketch": torch.tensor([0.0, 2.0, 0.0])}

    class Encoder:
        def label_features(self, label, templates):
            return table[label]

    goal = image_target.ImageTarget(style_mean=torch.tensor([0.0, 0.0, 0.5]), source_mean=torch.tensor([0.5, 0.0, 0.0]),
                                    direction=torch.zeros(3), count=1, num_sources=1, digest="")
    anchor = image_target.domain_anchor(Encoder(), goal, "photo", None, "single")
    assert torch.allclose(anchor, torch.tensor([0.5, 0.0, 0.5]))
    mixed = image_target.domain_anchor(Encoder(), goal, "photo", "sketch", "single")
    assert torch.allclose(mixed, torch.tensor([0.5 ** 0.5, 1.0, 0.5 ** 0.5]))


def test_learn_prompts_uses_the_given_anchor_in_eq5(tiny_clip):
    """The Stage-1 domain term is measured against target_label_features when given."""
    from ipl_diffusion.clip_text import CLIPPromptEncoder
    from ipl_diffusion.losses import domain_regularization_loss
    from ipl_diffusion.mapper import LatentMapper
    from ipl_diffusion.prompt_learning import learn_prompts

    clip, tokenizer = tiny_clip
    encoder = CLIPPromptEncoder(clip, tokenizer)
    latents = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    feats = torch.randn(8, encoder.projection_dim, generator=torch.Generator().manual_seed(1))
    anchor = torch.randn(encoder.projection_dim, generator=torch.Generator().manual_seed(2))
    module = LatentMapper(latent_dim=16, n_ctx=2, ctx_dim=encoder.hidden_size)
    module.reset_parameters(generator=torch.Generator().manual_seed(3))
    before = [p.detach().clone() for p in module.parameters()]
    learner = learn_prompts(encoder, latents, "photo", "style", n_ctx=2, stage1_iterations=1, stage1_batch_size=8,
                            label_templates="single", image_features=feats, prompt_module=module, progress=False,
                            target_label_features=anchor, stage1_learning_rate=1e-12)
    with torch.no_grad():
        for p, b in zip(module.parameters(), before):
            p.copy_(b)
        expected = domain_regularization_loss(encoder.encode_prompt_vectors(module(latents), "style"), anchor)
    assert learner.history[0]["L_domain"] == pytest.approx(float(expected), abs=1e-5)


def test_diffae_image_target_without_label_and_manual_is_nadas_direction(tmp_path):
    """DiffAE: style images only (no label): the prompts use the neutral word, the run records
    the image target; with the manual scheme Stage 2's direction is exactly NADA's img2img
    direction from the Stage-2 source images to the style images."""
    pipe = build_tiny_ipl_pipeline()
    sources = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 0.4 - 0.2
    folder = _write_folder(tmp_path / "style", _style_images(3))
    adapted = pipe.adapt(images=sources, target_images=folder, **FAST)
    cfg = adapted.adaptation_config
    assert adapted.config.target_label == image_target.NEUTRAL_TARGET_LABEL == cfg["target"]
    assert cfg["target_images"]["count"] == 3 and cfg["target_images"]["label_given"] is False
    assert adapted.unet is not None
    from ipl_diffusion.adaptation.diffae import DiffIPLImages, adapt_diffae

    style = torch.stack([torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                         for p in sorted(folder.iterdir())])
    result = adapt_diffae(pipe, DiffIPLImages(sources, target_images=style), "photo", "sketch", *_configs(scheme="manual"),
                          progress=False)
    processor = pipe.feature_extractor
    d = (_clip_unit_features(pipe.text_encoder, processor, style).mean(0)
         - _clip_unit_features(pipe.text_encoder, processor, sources).mean(0))
    got = F.normalize(result.target_text_features, dim=-1) - F.normalize(result.source_text_features, dim=-1)
    assert torch.allclose(F.normalize(got, dim=-1), F.normalize(d, dim=0).expand(4, -1), atol=1e-5)
    assert result.run_config["target_images"]["label_given"] is True


def _configs(**overrides):
    from ipl_diffusion.configs import resolve_configs

    options = {k: v for k, v in FAST.items() if k != "progress"}
    return resolve_configs("diffae", None, {**options, **overrides})


def test_gan_image_target_with_and_without_label(tiny_clip):
    """StyleGAN2: style images alone and beside a label; the layer choice and Stage 2 run, the
    adaptive scheme's directions differ per image, the manual scheme's equal NADA's d."""
    from test_stylegan2_pipeline import tiny_generator

    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    clip, tokenizer = tiny_clip
    pipe = StyleGANIPLPipeline.from_components(tiny_generator(), clip, tokenizer, CLIPImageProcessor(), source_label="photo")
    style = _style_images(4, 32)
    adapted = pipe.adapt(target_images=style, **GAN_FAST)
    assert adapted.config.target_label == "style" and adapted.adaptation_config["target_images"]["count"] == 4
    changed = any(not torch.equal(p, q) for p, q in zip(adapted.generator.parameters(), pipe.source_generator.parameters()))
    assert changed
    labelled = pipe.adapt("sketch", target_images=[Image.new("RGB", (20, 30), (250, 250, 250)), Image.new("RGB", (40, 40))],
                          **GAN_FAST)
    assert labelled.config.target_label == "sketch" and labelled.adaptation_config["target_images"]["label_given"]


def test_gan_manual_scheme_follows_nadas_img2img_direction(tiny_clip, monkeypatch):
    """GAN, manual scheme: every Stage-2 row's direction is d, computed from img2img_batch
    source samples of G_s (independently re-rendered here); the layer choice's global target
    is the style images' mean feature."""
    from test_stylegan2_pipeline import tiny_generator

    from ipl_diffusion.adaptation import stylegan2 as gan

    clip, tokenizer = tiny_clip
    seen = {}
    original = gan.GANIPLTrainer.__init__

    def spy(self, source_generator, prompt_features, *args, **kwargs):
        seen["features"], seen["layer_target"] = prompt_features, args[1]
        original(self, source_generator, prompt_features, *args, **kwargs)

    monkeypatch.setattr(gan.GANIPLTrainer, "__init__", spy)
    generator, style = tiny_generator(), _style_images(3, 32)
    options = {k: v for k, v in GAN_FAST.items() if k != "progress"}
    from ipl_diffusion.configs import resolve_configs

    stage1, stage2 = resolve_configs("stylegan2", None, {**options, "scheme": "manual"})
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    models = StyleGANIPLPipeline.from_components(generator, clip, tokenizer, CLIPImageProcessor(), source_label="photo")
    gan.adapt_stylegan2(models, "photo", None, stage1, stage2, target_images=style, progress=False)
    z = torch.randn(4, generator.style_dim, generator=torch.Generator().manual_seed(stage2.seed + 30_011))
    with torch.no_grad():
        sources = generator([generator.get_latent(z)], input_is_latent=True, randomize_noise=False)[0]
    d = F.normalize(_clip_unit_features(clip, CLIPImageProcessor(), style).mean(0)
                    - _clip_unit_features(clip, CLIPImageProcessor(), sources).mean(0), dim=0)
    w = generator.get_latent(torch.randn(3, generator.style_dim))
    src, tgt = seen["features"](w)
    got = F.normalize(F.normalize(tgt, dim=-1) - F.normalize(src, dim=-1), dim=-1)
    assert torch.allclose(got, d.expand(3, -1), atol=1e-5)
    # NADA's layer choice moves W+ towards the style images' mean unit feature, not a label's text
    style_mean = _clip_unit_features(clip, CLIPImageProcessor(), style).mean(0)
    assert torch.allclose(seen["layer_target"].float(), style_mean, atol=1e-5)


@pytest.mark.parametrize("case", ["empty folder", "unreadable file", "nan tensor", "no label no images", "bad type"])
def test_bad_target_images_are_user_errors(tmp_path, case):
    pipe = build_tiny_ipl_pipeline()
    if case == "empty folder":
        value, match = tmp_path / "empty", "no image files"
        value.mkdir()
    elif case == "unreadable file":
        value = _write_folder(tmp_path / "style", _style_images(2, 24))
        Image.new("RGB", (50, 20)).save(value / "other_size.png")  # another size is fine
        (value / "broken.png").write_bytes(b"not a png")
        match = "cannot read image .*broken.png"
    elif case == "nan tensor":
        value, match = _style_images(2), "target_images: image tensors contain NaN"
        value[0, 0, 0, 0] = float("nan")
    elif case == "no label no images":
        value, match = None, "give a target label, target_images"
    else:
        value, match = 3, "target_images must be a folder"
    with pytest.raises(UserError, match=match):
        pipe.adapt(images=torch.zeros(4, 3, 16, 16), target_images=value, **FAST)


def test_cli_target_images_flag(tmp_path, capsys):
    """``ipl adapt --target_images`` is generated from AdaptArguments; --target is optional with
    it, and neither is a one-line error before any model is loaded."""
    from ipl_diffusion.cli import main

    assert main(["adapt", "--output_dir", str(tmp_path / "run")]) != 0
    assert "give --target LABEL, --target_images FOLDER" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["adapt", "--target_images", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "run")]) != 0
    assert "no image files found" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_other_target_images(tmp_path):
    """A Stage-2 checkpoint written for other style images does not continue this run."""
    from ipl_diffusion.checkpointing import check_same_run

    saved = {"source": "photo", "target": "style", "target_images": {"sha256": "a" * 64}}
    check_same_run(tmp_path, saved, dict(saved))
    with pytest.raises(UserError, match="target_images.sha256"):
        check_same_run(tmp_path, saved, {**saved, "target_images": {"sha256": "b" * 64}})


def test_cli_adapt_with_target_images_only(tmp_path):
    """``ipl adapt --target_images DIR`` (no --target) on a saved tiny StyleGAN2 pipeline: the
    adapted pipeline's label is the neutral word and run_config.json records the images."""
    import json

    from test_stylegan2_pipeline import tiny_generator
    from tiny_clip import build_clip

    from ipl_diffusion.cli import main
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    clip, tokenizer = build_clip(max_position_embeddings=32)
    tokenizer.model_max_length = 32
    StyleGANIPLPipeline.from_components(tiny_generator(), clip, tokenizer, CLIPImageProcessor(),
                                        source_label="photo").save_pretrained(tmp_path / "source")
    folder = _write_folder(tmp_path / "style", _style_images(3, 32))
    argv = ["adapt", "--backend", "stylegan2", "--model", str(tmp_path / "source"), "--target_images", str(folder), "--output_dir",
            str(tmp_path / "run"), "--stage1_num_images", "4", "--stage1-iterations", "1", "--iterations", "2",
            "--batch-size", "2", "--img2img_batch", "4", "--label_templates", "single", "--device", "cpu"]
    assert main(argv) == 0
    adapted = StyleGANIPLPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert adapted.config.target_label == "style" and adapted.generator is not None
    recorded = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert recorded["target_images"]["count"] == 3 and recorded["stage1"]["img2img_batch"] == 4


def test_an_empty_target_images_folder_is_refused_naming_the_argument(tmp_path):
    from ipl_diffusion.adaptation.image_target import load_target_images

    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no image files found in '{tmp_path}' (given as target_images=)")):
        load_target_images(tmp_path, 32)
