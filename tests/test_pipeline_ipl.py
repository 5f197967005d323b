"""IPLPipeline end to end on tiny models: adapt, translate, save, reload, push (stubbed)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_ipl import FAST, SIZE, build_tiny_ipl_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source_pipe():
    return build_tiny_ipl_pipeline()


@pytest.fixture(scope="module")
def adapted(source_pipe):
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return source_pipe.adapt("sketch", images=images, **FAST)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Two images of different sizes and modes: RGBA 20x30 and 16-bit grayscale 40x24."""
    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 20, 4), dtype=np.uint8), "RGBA").save(folder / "a.png")
    Image.fromarray(rng.integers(0, 65535, (24, 40), dtype=np.uint16)).save(folder / "b.png")
    return folder


def test_adapt_returns_a_new_adapted_pipeline(source_pipe, adapted):
    assert source_pipe.unet is None and not source_pipe.is_adapted
    assert adapted.is_adapted and adapted.unet is not source_pipe.source_unet
    assert adapted.source_unet is source_pipe.source_unet  # frozen parts are shared
    assert adapted.config.target_label == "sketch" and adapted.config.source_label == "photo"
    cfg = adapted.adaptation_config
    assert cfg["stage1"]["scheme"] == "adaptive" and cfg["stage2"]["t0"] == 200
    assert type(adapted.mapper).__name__ == "LatentMapper"
    grid = adapted.sample_grid  # rows: source | reconstruction | adapted, labelled, tiles upscaled
    assert 3 * 96 <= grid.height < 4 * 96 and grid.width >= 4 * 96
    changed = [
        k for k, v in adapted.unet.state_dict().items() if not torch.equal(v, source_pipe.source_unet.state_dict()[k])
    ]
    assert changed


def test_translate_images_of_any_size_and_mode(adapted, odd_images):
    files = sorted(odd_images.iterdir())
    pil = adapted(files, output_type="pil").images
    assert len(pil) == 2 and all(im.size == (SIZE, SIZE) and im.mode == "RGB" for im in pil)
    array = adapted(files, output_type="np").images
    tensor = adapted([Image.open(f) for f in files], output_type="pt").images
    assert array.shape == (2, SIZE, SIZE, 3) and tensor.shape == (2, 3, SIZE, SIZE)
    assert 0 <= array.min() and array.max() <= 1
    torch.testing.assert_close(torch.from_numpy(array).permute(0, 3, 1, 2), tensor)
    # translation = source-UNet inversion + adapted-UNet decoding; differs from reconstruction
    z_sem, x_t0 = adapted.encode(files)
    recon = adapted.decode(z_sem, x_t0, unet=adapted.source_unet)
    assert not torch.allclose(adapted.decode(z_sem, x_t0), recon)
    assert adapted(folder := str(odd_images), output_type="pt", return_dict=False)[0].shape == (2, 3, SIZE, SIZE)
    del folder


def test_the_translate_images_example_writes_what_the_pipeline_gives_and_refuses_before_loading(adapted, odd_images, tmp_path):
    from repo_scripts import load_script

    from ipl_diffusion.errors import UserError
    from ipl_diffusion.images import load_image

    adapted.save_pretrained(tmp_path / "pipeline")
    script = load_script("examples/translate_images.py")
    out = tmp_path / "out"
    common = ["--model", str(tmp_path / "pipeline"), "--t0", "200", "--steps", "3"]
    script.main([*common, "--input", str(odd_images), "--output", str(out)])
    written = np.asarray(Image.open(out / "a.png"), dtype=np.float32) / 255
    direct = adapted(load_image(odd_images / "a.png", SIZE)[None], t0=200, num_inference_steps=3, output_type="np").images[0]
    assert np.abs(written - direct).max() <= 1 / 255 + 1e-6  # the pipeline's output, 8-bit rounded
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Refused before the model loads (a missing model folder is never reached), nothing written:
    missing = ["--model", str(tmp_path / "no-model"), "--t0", "200", "--steps", "3"]
    with pytest.raises(UserError, match=r"--output .* already holds the result of an earlier run \(a.png, b.png\)"):
        script.main([*missing, "--input", str(odd_images), "--output", str(out)])
    with pytest.raises(UserError, match="--input"):
        script.main([*missing, "--input", str(tmp_path / "no-images"), "--output", str(tmp_path / "new")])
    with pytest.raises(SystemExit) as exit_:  # argparse's refusal: status 2
        script.main([*missing, "--input", str(odd_images), "--output", str(odd_images)])
    assert exit_.value.code == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not (tmp_path / "new").exists()
    script.main([*common, "--input", str(odd_images), "--output", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]


def test_sample_is_seeded(adapted):
    a = adapted.sample(2, generator=torch.Generator().manual_seed(0), output_type="pt", num_inference_steps=4).images
    b = adapted.sample(2, generator=torch.Generator().manual_seed(0), output_type="pt", num_inference_steps=4).images
    c = adapted.sample(2, generator=torch.Generator().manual_seed(1), output_type="pt", num_inference_steps=4).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same output type as __call__ and StyleGANIPLPipeline.__call__ (diffusers' ImagePipelineOutput)
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

    out = adapted.sample(2, generator=torch.Generator().manual_seed(0), num_inference_steps=4)
    assert type(out) is ImagePipelineOutput and len(out.images) == 2 and out.images[0].size == (SIZE, SIZE)
    (images,) = adapted.sample(2, generator=torch.Generator().manual_seed(0), output_type="pt", num_inference_steps=4, return_dict=False)
    assert torch.equal(images, a)


def test_save_and_reload_in_a_fresh_process(adapted, odd_images, tmp_path):
    folder = tmp_path / "adapted"
    adapted.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_ipl", "IPLPipeline"]  # diffusers' custom-code layout
    assert index["unet"] == ["diffae_unet", "DiffAEUNetModel"]
    assert index["mapper"] == ["mapper", "LatentMapper"]
    assert index["target_label"] == "sketch" and index["adaptation"]["stage2"]["iterations"] == FAST["iterations"]
    assert (folder / "sample_grid.png").is_file()
    files = sorted(str(f) for f in odd_images.iterdir())
    expected = adapted(files, output_type="np").images
    np.save(tmp_path / "expected.npy", expected)
    script = (
        "import sys, numpy as np\n"
        "from ipl_diffusion import IPLPipeline\n"
        f"pipe = IPLPipeline.from_pretrained({str(folder)!r})\n"
        f"out = pipe({files!r}, output_type='np').images\n"
        f"assert pipe.config.target_label == 'sketch' and pipe.sample_grid is not None\n"
        f"np.testing.assert_allclose(out, np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-5)\n"
        "print('reloaded ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reloaded ok" in result.stdout


def test_source_pipeline_round_trip_without_unet(source_pipe, tmp_path):
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline

    source_pipe.save_pretrained(tmp_path / "src")
    assert not (tmp_path / "src" / "unet").exists()  # no duplicate of the source UNet
    loaded = IPLPipeline.from_pretrained(tmp_path / "src")
    assert loaded.unet is None and loaded.config.source_label == "photo"
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    a = source_pipe(x, output_type="pt", num_inference_steps=3, num_inversion_steps=3).images
    b = loaded(x, output_type="pt", num_inference_steps=3, num_inversion_steps=3).images
    torch.testing.assert_close(a, b)


def test_missing_component_and_offline_hub_id(source_pipe, tmp_path, monkeypatch):
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline

    source_pipe.save_pretrained(tmp_path / "broken")
    shutil.rmtree(tmp_path / "broken" / "semantic_encoder")
    with pytest.raises(FileNotFoundError, match="semantic_encoder"):
        IPLPipeline.from_pretrained(tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        IPLPipeline.from_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="nobody/no-such-ipl-model.*local folder"):
        IPLPipeline.from_pretrained("nobody/no-such-ipl-model")
    assert time.perf_counter() - started < 10  # no network wait


def test_adapt_errors_before_work(source_pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        source_pipe.adapt("sketch", images=str(tmp_path / "missing-folder"), **FAST)
    with pytest.raises(ValueError, match="(?i)empty|blank"):
        source_pipe.adapt("   ", images=torch.zeros(4, 3, SIZE, SIZE), **FAST)
    with pytest.raises(ValueError, match="t0"):
        source_pipe.adapt("sketch", images=torch.zeros(4, 3, SIZE, SIZE), **{**FAST, "t0": 5000})


def test_push_to_hub_uploads_weights_card_grid_and_code(adapted, monkeypatch, tmp_path):
    import diffusers.utils.hub_utils as hub_utils

    calls = {}

    class Repo:
        repo_id = "me/shapes-photo-to-sketch"

    def fake_create_repo(repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return Repo()

    def fake_upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        calls["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        calls["readme"] = (folder / "README.md").read_text()
        calls["upload"] = kwargs
        return "https://huggingface.co/me/shapes-photo-to-sketch/commit/0"

    monkeypatch.setattr(hub_utils, "create_repo", fake_create_repo)
    monkeypatch.setattr(hub_utils, "upload_folder", fake_upload_folder)
    url = adapted.push_to_hub("me/shapes-photo-to-sketch", private=True)
    assert url.endswith("/commit/0")
    assert calls["create_repo"] == ("me/shapes-photo-to-sketch", {"private": True, "token": None, "exist_ok": True})
    files = calls["files"]
    for expected in (
        "README.md",
        "pipeline_ipl.py",
        "sample_grid.png",
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "source_unet/diffusion_pytorch_model.safetensors",
        "semantic_encoder/diffusion_pytorch_model.safetensors",
        "mapper/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        assert expected in files, expected
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".ckpt"))]  # no pickles
    readme = calls["readme"]
    for needle in ("`photo`", "`sketch`", "tiny-random-diffae", "`adaptive`", "| stage2 | `t0` | `200` |", "sample_grid.png"):
        assert needle in readme, needle
    assert calls["upload"]["repo_id"] == "me/shapes-photo-to-sketch"
    # plain diffusers loading of the uploaded folder: tests/test_hub_layout.py


def test_model_recommended_adapt_defaults(tmp_path):
    """A model's config.adapt_defaults fill the options a caller leaves out (explicit wins)."""
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline

    pipe = build_tiny_ipl_pipeline()
    recommended = {k: v for k, v in FAST.items() if k != "progress"}
    recommended["iterations"] = 1
    pipe.register_to_config(adapt_defaults=recommended)
    pipe.save_pretrained(tmp_path / "src")
    pipe = IPLPipeline.from_pretrained(tmp_path / "src")
    assert pipe.config.adapt_defaults["t0"] == 200
    images = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    adapted = pipe.adapt("sketch", images=images, batch_size=4, progress=False)
    stage2 = adapted.adaptation_config["stage2"]
    assert stage2["iterations"] == 1 and stage2["t0"] == 200 and stage2["batch_size"] == 4
    assert adapted.config.adapt_defaults == pipe.config.adapt_defaults


def test_from_components_assembles_a_source_pipeline(source_pipe, tmp_path):
    """The shipped Shapes folder is assembled this way (examples/assemble_shapes_ipl.py)."""
    from ipl_diffusion.pipelines.pipeline_diffae import DiffAEPipeline
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline

    diffae = DiffAEPipeline(
        semantic_encoder=source_pipe.semantic_encoder, unet=source_pipe.source_unet, scheduler=source_pipe.scheduler,
        latent_net=source_pipe.latent_net, latent_scheduler=source_pipe.latent_scheduler,
    )
    diffae.save_pretrained(tmp_path / "diffae")
    source_pipe.text_encoder.save_pretrained(tmp_path / "clip")
    source_pipe.tokenizer.save_pretrained(tmp_path / "clip")
    source_pipe.feature_extractor.save_pretrained(tmp_path / "clip")
    pipe = IPLPipeline.from_components(tmp_path / "diffae", tmp_path / "clip", source_label="photo",
                                       adapt_defaults={"t0": 200})
    assert pipe.unet is None and pipe.config.base_model == str(tmp_path / "diffae")
    assert pipe.feature_extractor is not None and pipe.latent_net is not None
    pipe.save_pretrained(tmp_path / "ipl")
    reloaded = IPLPipeline.from_pretrained(tmp_path / "ipl")
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    torch.testing.assert_close(
        reloaded(x, output_type="pt", num_inversion_steps=3, num_inference_steps=3).images,
        source_pipe(x, output_type="pt", t0=200, num_inversion_steps=3, num_inference_steps=3).images,
    )
    with pytest.raises(ValueError, match="tokenizer"):
        IPLPipeline.from_components(diffae, source_pipe.text_encoder)


def test_from_components_reads_the_image_processor_of_a_hub_id(source_pipe, tmp_path, monkeypatch):
    """A CLIP given as a Hub id brings its own mean / std (openai/clip-vit-base-patch32 ships a
    preprocessor_config.json). The id is served offline from a Hub cache laid out as
    huggingface_hub writes it: models--org--name/refs/main naming a snapshot folder."""
    import huggingface_hub.constants
    from transformers import CLIPImageProcessorPil

    from ipl_diffusion.pipelines.pipeline_diffae import DiffAEPipeline
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-clip" / "snapshots" / ("0" * 40)
    source_pipe.text_encoder.save_pretrained(snapshot)
    source_pipe.tokenizer.save_pretrained(snapshot)
    CLIPImageProcessorPil(image_mean=[0.25, 0.5, 0.75], image_std=[0.5, 0.5, 0.5]).save_pretrained(snapshot)
    (cache / "models--someone--tiny-clip" / "refs").mkdir()
    (cache / "models--someone--tiny-clip" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    diffae = DiffAEPipeline(
        semantic_encoder=source_pipe.semantic_encoder, unet=source_pipe.source_unet, scheduler=source_pipe.scheduler,
    )
    pipe = IPLPipeline.from_components(diffae, "someone/tiny-clip", source_label="photo")
    assert pipe.feature_extractor is not None and list(pipe.feature_extractor.image_mean) == [0.25, 0.5, 0.75]


def test_xformers_where_it_cannot_run_warns_once_and_keeps_outputs(monkeypatch):
    """The xformers fallback on the whole IPL pipeline: the CLIP text encoder and every DiffAE model are
    components, yet enabling xformers gives one warning, SDPA everywhere and equal outputs."""
    import warnings

    import ipl_diffusion.pipelines.pipeline_diffae as module
    from diffusers.models.attention_processor import AttnProcessor2_0

    monkeypatch.setattr(module, "xformers_unavailable_reason", lambda: "no CUDA device")
    pipe = build_tiny_ipl_pipeline()
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    z_sem, x_t0 = pipe.encode(images, t0=400, num_inversion_steps=3)
    before = pipe.decode(z_sem, x_t0, t0=400, num_inference_steps=3, unet=pipe.source_unet)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.enable_xformers_memory_efficient_attention()
    assert len([w for w in caught if "xformers" in str(w.message)]) == 1
    for name in ("semantic_encoder", "source_unet"):
        assert all(isinstance(p, AttnProcessor2_0) for p in getattr(pipe, name).attn_processors.values())
    after = pipe.decode(z_sem, x_t0, t0=400, num_inference_steps=3, unet=pipe.source_unet)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_known_domains_refuse_other_labels_before_work():
    """A pipeline whose CLIP knows a closed set of domains (the shipped Shapes model records
    them) refuses other labels in the Python API too, naming the known ones."""
    pipe = build_tiny_ipl_pipeline()
    pipe.register_to_config(known_domains=["photo", "sketch"])
    with pytest.raises(ValueError, match="photo, sketch.*'Wall painting'"):
        pipe.adapt("Wall painting", source="Photo", images=torch.zeros(2, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="'Cubism'"):
        pipe.adapt("sketch", source="Cubism", images=torch.zeros(2, 3, SIZE, SIZE))


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_one_seed_governs_both_stages(source_pipe):
    """The same seed reproduces the run bit for bit (mapper and UNet); another seed gives
    another mapper; run_config records the seed. Stage 1 once ignored it (always seed 3)."""
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    pool = torch.rand(48, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * 2 - 1
    runs = [source_pipe.adapt("sketch", images=images, stage1_images=pool, seed=s, **FAST) for s in (5, 5, 6)]
    same, again, other = ([_weights(r.mapper), _weights(r.unet)] for r in runs)
    for a, b in zip(same, again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(same[0][k], other[0][k]) for k in same[0])
    cfg = runs[0].adaptation_config
    assert cfg["seed"] == 5 and runs[2].adaptation_config["seed"] == 6
    # a 48-image pool holds out 9 (a fifth) and reports their prompt retrieval
    assert cfg["stage1"]["heldout_images"] == 9 and cfg["stage1"]["pool_images"] == 39
    assert 0.0 <= cfg["stage1"]["heldout_retrieval"] <= 1.0


def test_each_image_meets_its_own_text_direction(source_pipe):
    """Stage 2's loss pairs row i of ΔT with image i: an independent computation on the
    same rows matches, and the prompts shuffled across images give another loss."""
    from ipl_diffusion.adaptation import diffae
    from ipl_diffusion.adaptation.diffae_trainer import DiffAEStage2Trainer
    from ipl_diffusion.clip_image import clip_image_features
    from ipl_diffusion.configs import DiffAEStage2Config
    from ipl_diffusion.losses import adaptive_directional_loss

    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    pipe = source_pipe
    cache = diffae.encode_sources(pipe.semantic_encoder, pipe.source_unet, pipe.scheduler, images, 200, 4, progress=False)
    d = pipe.text_encoder.config.projection_dim
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(4, d, generator=gen), torch.randn(4, d, generator=gen)
    features = clip_image_features(pipe.text_encoder, pipe.feature_extractor)
    config = DiffAEStage2Config(t0=200, num_train_steps=2, iterations=1, batch_size=2)
    trainer = DiffAEStage2Trainer(pipe.source_unet, pipe.scheduler, cache, src, tgt, features, config)
    adapted = torch.rand(2, 3, SIZE, SIZE, generator=gen) * 2 - 1
    index = [3, 1]
    with torch.no_grad():
        loss = trainer.losses(adapted, index)["directional"] / config.clip_loss_weight
        expected = adaptive_directional_loss(features(images[index]), features(adapted), src[index], tgt[index])
        trainer.src_text, trainer.tgt_text = src[[1, 2, 3, 0]], tgt[[1, 2, 3, 0]]
        shuffled = trainer.losses(adapted, index)["directional"] / config.clip_loss_weight
    torch.testing.assert_close(loss, expected)
    assert abs(float(loss) - float(shuffled)) > 1e-4


def test_resume_with_another_stage1_option_is_refused_before_anything_is_rewritten(source_pipe, tmp_path):
    """The DiffAE side of tests/test_stylegan2_pipeline.py's check: the run identity is compared
    with the checkpoint before the sources are encoded or Stage 1 runs."""
    from ipl_diffusion.errors import UserError

    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    kwargs = dict(FAST, images=images, output_dir=str(tmp_path), checkpointing_steps=1)
    source_pipe.adapt("sketch", **kwargs)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="stage1.domain_regularizer was 'feature' there, 'direction' now"):
        source_pipe.adapt("sketch", **dict(kwargs, resume_from_checkpoint="latest", domain_regularizer="direction"))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before



def test_a_clip_folder_without_an_image_processor_is_read_with_openai_statistics_and_a_warning(source_pipe, tmp_path):
    import warnings

    from ipl_diffusion.pipelines.loading import clip_components

    source_pipe.text_encoder.save_pretrained(tmp_path / "clip")
    source_pipe.tokenizer.save_pretrained(tmp_path / "clip")
    with pytest.warns(UserWarning, match="no image processor .* OpenAI CLIP's mean / std"):
        assert clip_components(tmp_path / "clip")["feature_extractor"] is None
    source_pipe.feature_extractor.save_pretrained(tmp_path / "clip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the folder's own processor: nothing to say
        assert clip_components(tmp_path / "clip")["feature_extractor"] is not None
    (tmp_path / "clip" / "preprocessor_config.json").write_text("{not json")  # damaged: an error, not "none"
    with pytest.raises(FileNotFoundError, match="CLIP image processor.*preprocessor_config.json"):
        clip_components(tmp_path / "clip")
