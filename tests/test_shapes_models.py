"""The shipped Shapes models load through the real loading path and do their job.

These read the folders in ``ipl_diffusion/shapes_models`` (package data) with
``from_pretrained``; nothing is downloaded. Accuracy checks use a few fresh images, so they
are sanity checks of the shipped weights, not the full evaluations recorded in each folder's
``training_record.json``.
"""

import hashlib
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from ipl_diffusion.shapes import CLIP_COMPONENTS, MODELS_DIR, STYLES, ShapesRenderer, default_model_path

FRESH_SEED = 55_555  # never drawn by the training scripts' evaluation seeds


def test_default_model_path_errors():
    with pytest.raises(ValueError, match="known: diffae"):
        default_model_path("vae")


def test_shipped_weights_store_the_clip_once_and_fit_the_size_budget():
    weights = {}
    for path in sorted(MODELS_DIR.rglob("*.safetensors")):
        weights.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(str(path.relative_to(MODELS_DIR)))
    assert [paths for paths in weights.values() if len(paths) > 1] == [], "weights stored more than once"
    copies = [str(p.relative_to(MODELS_DIR)) for backend in ("diffae", "stylegan2")
              for p in (default_model_path(backend) / name for name in CLIP_COMPONENTS) if p.exists()]
    assert copies == [], "the shipped pipelines take their CLIP from clip/"
    total = sum(p.stat().st_size for p in MODELS_DIR.rglob("*") if p.is_file())
    assert total <= 24 * 1024 * 1024, f"shapes_models is {total / 2**20:.1f} MiB > 24 MiB"  # 21.0 MiB shipped
    assert not list(MODELS_DIR.rglob("*.bin")) and not list(MODELS_DIR.rglob("*.pt")), "ship safetensors only"


def _pipeline_class(backend):
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    return IPLPipeline if backend == "diffae" else StyleGANIPLPipeline


def _assert_is_the_shapes_clip(model):
    from safetensors.torch import load_file

    shipped = load_file(default_model_path("clip") / "model.safetensors")
    state = model.state_dict()
    assert shipped and all(torch.equal(state[key], value) for key, value in shipped.items())


@pytest.mark.parametrize("backend", ["diffae", "stylegan2"])
def test_shipped_pipeline_loads_the_one_shapes_clip_and_saves_it_whole(backend, tmp_path, monkeypatch):
    """The shipped folders hold no CLIP; from_pretrained fills it in from clip/, and
    save_pretrained writes a complete folder that loads anywhere."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cls = _pipeline_class(backend)
    pipe = cls.from_pretrained(default_model_path(backend))
    _assert_is_the_shapes_clip(pipe.text_encoder)
    assert pipe.tokenizer("a sketch of a red ring").input_ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.feature_extractor.crop_size["height"] == 32

    pipe.save_pretrained(tmp_path / "copy")
    assert all((tmp_path / "copy" / name).is_dir() for name in CLIP_COMPONENTS)
    _assert_is_the_shapes_clip(cls.from_pretrained(tmp_path / "copy").text_encoder)


def _generator_dtype(pipe):
    return next((pipe.source_unet if hasattr(pipe, "source_unet") else pipe.source_generator).parameters()).dtype


@pytest.mark.parametrize("backend", ["diffae", "stylegan2"])
@pytest.mark.parametrize("kwargs, generator_dtype, clip_dtype", [
    ({"dtype": torch.bfloat16}, torch.bfloat16, torch.bfloat16),
    ({"torch_dtype": torch.bfloat16}, torch.bfloat16, torch.bfloat16),
    ({"dtype": None, "torch_dtype": torch.bfloat16}, torch.bfloat16, torch.bfloat16),  # None reads as not given
    ({"dtype": {"default": torch.bfloat16}}, torch.bfloat16, torch.bfloat16),
    ({"dtype": {"text_encoder": torch.bfloat16}}, torch.float32, torch.bfloat16),  # no "default": float32
    ({"dtype": "float16"}, torch.float32, torch.float32),  # not a dtype: diffusers loads float32
], ids=["dtype", "torch_dtype", "None_then_torch_dtype", "dict_default", "dict_text_encoder", "string"])
def test_shipped_pipeline_loads_its_clip_in_the_dtype_diffusers_gives_the_rest(backend, kwargs, generator_dtype, clip_dtype):
    """diffusers casts only what it loads; the CLIP filled in from clip/ must get the dtype
    diffusers would give it from a folder holding text_encoder/ (its dtype / torch_dtype rules)."""
    pipe = _pipeline_class(backend).from_pretrained(default_model_path(backend), **kwargs)
    assert _generator_dtype(pipe) == generator_dtype
    assert pipe.text_encoder.dtype == clip_dtype


def test_text_encoder_passed_to_a_shipped_folder_wins():
    from transformers import CLIPModel

    own = CLIPModel.from_pretrained(default_model_path("clip"))
    pipe = _pipeline_class("stylegan2").from_pretrained(default_model_path("stylegan2"), text_encoder=own)
    assert pipe.text_encoder is own and pipe.tokenizer is not None  # the rest still comes from clip/


@pytest.mark.parametrize("backend", ["diffae", "stylegan2"])
def test_a_copied_shipped_folder_without_its_clip_names_the_missing_folders(backend, tmp_path):
    """Only the package's own folders take the CLIP from clip/; a copy elsewhere must be complete."""
    from ipl_diffusion.errors import UserFileNotFoundError

    shutil.copytree(default_model_path(backend), tmp_path / backend)
    with pytest.raises(UserFileNotFoundError, match=r"component folder\(s\) text_encoder, tokenizer, feature_extractor missing") as err:
        _pipeline_class(backend).from_pretrained(tmp_path / backend)
    # The message's remedy works as written: the components from shapes_models/clip.
    assert "ipl_diffusion/shapes_models/clip" in str(err.value)
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    clip = default_model_path("clip")
    pipe = _pipeline_class(backend).from_pretrained(
        tmp_path / backend, text_encoder=CLIPModel.from_pretrained(clip), tokenizer=CLIPTokenizer.from_pretrained(clip),
        feature_extractor=CLIPImageProcessor.from_pretrained(clip))
    assert pipe.text_encoder is not None


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


def test_shipped_shapes_diffae_reconstructs_and_samples():
    """The DiffAE inside the shipped pipeline: the DDIM inversion round trip, and seeded
    unconditional sampling (latent net -> z_sem, x_T ~ N(0, I)) through DiffAEPipeline that the
    oracle reads as photos of several shapes and colours."""
    from ipl_diffusion.shapes.oracle import ShapesOracle
    from ipl_diffusion.ddim import ddim_decode, ddim_invert
    from ipl_diffusion.pipelines.pipeline_diffae import DiffAEPipeline
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline

    pipe = IPLPipeline.from_pretrained(str(default_model_path("diffae")))
    images, _ = ShapesRenderer(32).sample(4, seed=FRESH_SEED + 2, style="photo")
    with torch.no_grad():
        z_sem = pipe.semantic_encoder(images)
        x_T = ddim_invert(pipe.source_unet, images, z_sem, pipe.scheduler, 20)
        recon = ddim_decode(pipe.source_unet, x_T, z_sem, pipe.scheduler, 20)
    assert z_sem.shape == (4, pipe.source_unet.config.z_sem_channels)
    assert F.mse_loss(recon, images) < 0.01
    assert pipe.latent_net is not None and float(pipe.latent_net.conds_std.min()) > 0
    record = json.loads((default_model_path("diffae") / "training_record.json").read_text())
    assert record["task"] == "shapes_diffae" and record["evaluation"]["reconstruction_psnr_db"] > 25

    diffae = DiffAEPipeline(
        semantic_encoder=pipe.semantic_encoder,
        unet=pipe.source_unet,
        scheduler=pipe.scheduler,
        latent_net=pipe.latent_net,
        latent_scheduler=pipe.latent_scheduler,
    )
    diffae.set_progress_bar_config(disable=True)
    draws = [
        diffae(batch_size=4, num_inference_steps=5, latent_num_inference_steps=10, seed=FRESH_SEED, output_type="pt").images
        for _ in range(2)
    ]
    assert draws[0].shape == (4, 3, 32, 32) and 0 <= float(draws[0].min()) and float(draws[0].max()) <= 1
    assert torch.equal(draws[0], draws[1])

    # Clean samples: the v-prediction model (scheduler config) sampled with 20 DDIM steps.
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    samples = diffae(batch_size=32, num_inference_steps=20, latent_num_inference_steps=50, seed=FRESH_SEED, output_type="pt").images
    pred = ShapesOracle.from_pretrained(default_model_path("oracle")).eval().predict(samples * 2 - 1)
    assert (pred["style"] == STYLES.index("photo")).float().mean() >= 0.8
    assert pred["shape"].unique().numel() >= 4 and pred["color"].unique().numel() >= 4


def test_shipped_diff_ipl_pipeline_loads_offline_and_translates(monkeypatch):
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline

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


def test_shipped_shapes_stylegan2_loads_offline_and_samples_photos(monkeypatch):
    from ipl_diffusion.shapes.oracle import ShapesOracle
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StyleGANIPLPipeline.from_pretrained(str(default_model_path("stylegan2")))
    assert pipe.config.source_label == "photo" and not pipe.is_adapted
    assert pipe.config.known_domains == list(STYLES)
    assert pipe.image_size == 32
    z = torch.randn(32, pipe.source_generator.style_dim, generator=torch.Generator().manual_seed(FRESH_SEED))
    samples = pipe(latents=z, source=True, output_type="pt").images
    assert samples.shape == (32, 3, 32, 32)
    pred = ShapesOracle.from_pretrained(default_model_path("oracle")).eval().predict(samples * 2 - 1)
    # The bar its samples were shipped at: photos, with (nearly) every shape and colour.
    assert (pred["style"] == STYLES.index("photo")).float().mean() >= 0.9
    assert pred["shape"].unique().numel() >= 5 and pred["color"].unique().numel() >= 5
    record = json.loads((default_model_path("stylegan2") / "training_record.json").read_text())
    assert record["task"] == "shapes_stylegan2" and record["steps"] > 0
    assert record["samples_oracle"]["shape_entropy"] >= 1.6  # of log 6 = 1.79; the blobs had 1.31


def test_shipped_stylegan2_refuses_labels_its_clip_does_not_know():
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    pipe = StyleGANIPLPipeline.from_pretrained(str(default_model_path("stylegan2")))
    with pytest.raises(ValueError, match="trained only on the domains photo, sketch.*open-vocabulary CLIP: from_components"):
        pipe.adapt("Wall painting", iterations=1, stage1_iterations=1, stage1_num_images=2)


def test_a_pipeline_class_refuses_the_other_familys_folder_and_names_its_loader():
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    with pytest.raises(ValueError, match=r"holds a StyleGANIPLPipeline .*load it with StyleGANIPLPipeline.from_pretrained"):
        IPLPipeline.from_pretrained(str(default_model_path("stylegan2")))
    with pytest.raises(ValueError, match=r"holds an IPLPipeline .*load it with IPLPipeline.from_pretrained"):
        StyleGANIPLPipeline.from_pretrained(str(default_model_path("diffae")))


def test_shipped_adapt_defaults_are_the_documented_ones():
    """The folders' recorded adapt_defaults are ipl_diffusion.shapes' SHAPES_* constants, whose
    comment says how each value was chosen (one source of truth for `ipl adapt`'s defaults)."""
    import json

    from ipl_diffusion.shapes import SHAPES_ADAPT_DEFAULTS, SHAPES_GAN_ADAPT_DEFAULTS

    for backend, expected in (("diffae", SHAPES_ADAPT_DEFAULTS), ("stylegan2", SHAPES_GAN_ADAPT_DEFAULTS)):
        index = json.loads((default_model_path(backend) / "model_index.json").read_text())
        assert index["adapt_defaults"] == expected, backend


def test_assembling_a_shipped_folder_leaves_the_clip_to_clip_folder(tmp_path, monkeypatch):
    """examples/assemble_shapes_ipl.py writes the shipped layout into shapes_models (here a
    stand-in MODELS_DIR holding the real clip/) and a complete folder anywhere else."""
    import ipl_diffusion.shapes as shapes
    from ipl_diffusion.models.stylegan2 import StyleGAN2Generator
    from repo_scripts import load_script

    script = load_script("examples/assemble_shapes_ipl.py")
    StyleGAN2Generator.from_pretrained(default_model_path("stylegan2") / "source_generator").save_pretrained(tmp_path / "g_ema")
    clip = default_model_path("clip")
    models = tmp_path / "shapes_models"
    models.mkdir()
    (models / "clip").symlink_to(clip)
    monkeypatch.setattr(shapes, "MODELS_DIR", models.resolve())

    shipped = script.assemble("stylegan2", tmp_path / "g_ema", models / "clip", models / "stylegan2")
    assert not any((shipped / name).exists() for name in CLIP_COMPONENTS)
    _assert_is_the_shapes_clip(_pipeline_class("stylegan2").from_pretrained(shipped).text_encoder)
    elsewhere = script.assemble("stylegan2", tmp_path / "g_ema", clip, tmp_path / "elsewhere")
    assert all((elsewhere / name).is_dir() for name in CLIP_COMPONENTS)
