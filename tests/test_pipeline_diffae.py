"""DiffAEPipeline: encode / decode / sample / reconstruct, output types, seeds, save/load
(also in a fresh process), push_to_hub (stubbed), xformers fallback, missing folders, offline Hub ids."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffae_tiny import SIZE, Z, diffae_scheduler, latent_scheduler, tiny_encoder, tiny_latent_net, tiny_unet

from ipl_diffusion import DiffAEPipeline
from ipl_diffusion.ddim import ddim_decode, ddim_invert
from ipl_diffusion.pipelines.pipeline_diffae import DiffAEPipelineOutput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def pipe():
    latent = tiny_latent_net()
    latent.set_statistics(torch.randn(32, Z, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.2)
    pipeline = DiffAEPipeline(
        semantic_encoder=tiny_encoder(),
        unet=tiny_unet(),
        scheduler=diffae_scheduler(),
        latent_net=latent,
        latent_scheduler=latent_scheduler(),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def images(n=2, seed=0):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_unconditional_sampling_output_types_and_seeds(pipe):
    kwargs = dict(batch_size=2, num_inference_steps=3, latent_num_inference_steps=4)
    out = pipe(**kwargs, seed=0, output_type="pt")
    assert isinstance(out, DiffAEPipelineOutput)
    assert out.images.shape == (2, 3, SIZE, SIZE) and 0 <= out.images.min() and out.images.max() <= 1
    assert out.z_sem.shape == (2, Z) and out.x_T.shape == (2, 3, SIZE, SIZE)
    again = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np")
    assert again.images.shape == (2, SIZE, SIZE, 3)
    assert np.array_equal(again.images, out.images.permute(0, 2, 3, 1).numpy())  # same seed, same images
    other = pipe(**kwargs, seed=1, output_type="pt")
    assert not torch.allclose(other.images, out.images)
    pil = pipe(**kwargs, seed=0).images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (SIZE, SIZE)
    latent = pipe(**kwargs, seed=0, output_type="latent", return_dict=False)
    assert isinstance(latent, tuple) and torch.allclose((latent[0] + 1) / 2, out.images, atol=1e-6)
    with pytest.raises(ValueError, match="output_type"):
        pipe(**kwargs, output_type="jpeg")
    with pytest.raises(ValueError, match="either generator or seed"):
        pipe(**kwargs, seed=0, generator=torch.Generator())


def test_sampled_z_sem_is_denormalised(pipe):
    z = pipe.sample_z_sem(64, torch.Generator().manual_seed(0), num_inference_steps=5)
    assert z.shape == (64, Z)
    expected = ddim_decode(
        pipe.latent_net, torch.randn(64, Z, generator=torch.Generator().manual_seed(0)), None, pipe.latent_scheduler, 5
    )
    assert torch.allclose(z, pipe.latent_net.denormalize(expected), atol=1e-5)


def test_encode_decode_reconstruction_matches_the_ddim_functions(pipe):
    x0 = images()
    z_sem, x_T = pipe.encode(x0, num_inference_steps=5)
    assert torch.allclose(z_sem, pipe.semantic_encoder(x0), atol=1e-6)
    assert torch.allclose(x_T, ddim_invert(pipe.unet, x0, z_sem, pipe.scheduler, 5), atol=1e-6)
    rec = pipe.decode(z_sem, x_T, num_inference_steps=5)
    assert torch.allclose(rec, ddim_decode(pipe.unet, x_T, z_sem, pipe.scheduler, 5), atol=1e-6)
    out = pipe(images=x0, num_inference_steps=5, num_inversion_steps=5, output_type="latent")
    assert torch.allclose(out.images, rec, atol=1e-6) and torch.allclose(out.x_T, x_T, atol=1e-6)
    # semantic-only reconstruction: random x_T
    semantic = pipe(images=x0, invert=False, num_inference_steps=2, seed=0, output_type="pt")
    assert torch.allclose(semantic.z_sem, z_sem, atol=1e-6)
    with pytest.raises(ValueError, match="images or z_sem"):
        pipe(images=x0, z_sem=z_sem)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        pipe.encode(x0 * 127.5 + 127.5)
    with pytest.raises(ValueError, match="NaN"):
        pipe.encode(torch.full((1, 3, SIZE, SIZE), float("nan")))


def test_images_from_files_of_any_mode_and_size(pipe, tmp_path):
    PIL.Image.new("RGBA", (40, 24), (255, 0, 0, 128)).save(tmp_path / "a.png")
    PIL.Image.new("L", (20, 30), 100).save(tmp_path / "b.jpg")
    out = pipe(images=tmp_path, num_inference_steps=2, num_inversion_steps=2, output_type="pt")
    assert out.images.shape == (2, 3, SIZE, SIZE)
    z_sem, _ = pipe.encode([str(tmp_path / "a.png")], num_inference_steps=2)
    assert z_sem.shape == (1, Z)
    (tmp_path / "c.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match="c.png"):
        pipe.encode(tmp_path, num_inference_steps=2)


def test_missing_folder_fails_before_any_model_call(pipe, tmp_path):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    pipe.semantic_encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        pipe(images=tmp_path / "missing-folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        pipe.encode(empty)
    assert calls == []


def test_no_latent_net_cannot_sample(pipe):
    bare = DiffAEPipeline(semantic_encoder=pipe.semantic_encoder, unet=pipe.unet, scheduler=pipe.scheduler)
    bare.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="no latent_net"):
        bare(batch_size=1)
    out = bare(z_sem=torch.randn(1, Z), num_inference_steps=2, output_type="pt")  # given z_sem works
    assert out.images.shape == (1, 3, SIZE, SIZE)


@pytest.mark.slow
def test_save_load_round_trip_and_fresh_process(pipe, tmp_path):
    folder = tmp_path / "diffae"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_diffae", "DiffAEPipeline"]  # diffusers' custom-code layout
    assert index["unet"] == ["diffae_unet", "DiffAEUNetModel"]
    assert index["semantic_encoder"] == ["semantic_encoder", "SemanticEncoder"]
    assert index["latent_net"] == ["latent_net", "LatentNetModel"]
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    kwargs = dict(batch_size=2, num_inference_steps=3, latent_num_inference_steps=3, output_type="latent")
    expected = pipe(**kwargs, seed=0).images

    loaded = DiffAEPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded(**kwargs, seed=0).images, expected)
    assert torch.equal(loaded.latent_net.conds_mean, pipe.latent_net.conds_mean)

    torch.save(expected, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from ipl_diffusion import DiffAEPipeline\n"
        f"pipe = DiffAEPipeline.from_pretrained({str(folder)!r})\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        f"out = pipe(batch_size=2, num_inference_steps=3, latent_num_inference_steps=3, output_type='latent', seed=0)\n"
        f"expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)\n"
        "sys.exit(0 if torch.equal(out.images, expected) else 3)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_optional_latent_net_saved_as_none(pipe, tmp_path):
    bare = DiffAEPipeline(semantic_encoder=pipe.semantic_encoder, unet=pipe.unet, scheduler=pipe.scheduler)
    bare.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["latent_net"] == [None, None]
    assert DiffAEPipeline.from_pretrained(tmp_path).latent_net is None


def test_offline_unknown_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the Hub cache"):
        DiffAEPipeline.from_pretrained("someone/not-a-cached-diffae")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        DiffAEPipeline.from_pretrained(ROOT + "/tests")


def test_push_to_hub_uploads_the_saved_folder(pipe, monkeypatch):
    import diffusers.utils.hub_utils as hub_utils

    calls = {}

    class Repo:
        repo_id = "me/tiny-diffae"

    def fake_create_repo(repo_id, **kwargs):
        calls["create"] = repo_id
        return Repo()

    def fake_upload_folder(**kwargs):
        calls["files"] = sorted(os.listdir(kwargs["folder_path"]))
        calls["unet_files"] = sorted(os.listdir(os.path.join(kwargs["folder_path"], "unet")))
        return "https://huggingface.co/me/tiny-diffae/commit/0"

    monkeypatch.setattr(hub_utils, "create_repo", fake_create_repo)
    monkeypatch.setattr(hub_utils, "upload_folder", fake_upload_folder)
    url = pipe.push_to_hub("me/tiny-diffae")
    assert url.endswith("/commit/0") and calls["create"] == "me/tiny-diffae"
    assert {"model_index.json", "unet", "semantic_encoder", "scheduler", "latent_net", "README.md"} <= set(calls["files"])
    assert "diffusion_pytorch_model.safetensors" in calls["unet_files"]
    # diffusers' push goes through our save_pretrained: the custom-code layout is uploaded too
    assert "pipeline_diffae.py" in calls["files"] and "diffae_unet.py" in calls["unet_files"]


def test_pipeline_xformers_fallback_warns_once(pipe, monkeypatch):
    import ipl_diffusion.pipelines.pipeline_diffae as module

    monkeypatch.setattr(module, "xformers_unavailable_reason", lambda: "no CUDA device")
    z = torch.randn(1, Z)
    x_T = torch.randn(1, 3, SIZE, SIZE)
    before = pipe.decode(z, x_T, num_inference_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.enable_xformers_memory_efficient_attention()
    assert len([w for w in caught if "xformers" in str(w.message)]) == 1
    assert torch.allclose(pipe.decode(z, x_T, num_inference_steps=2), before, atol=1e-6)


def test_half_precision_models_keep_a_float32_chain(pipe):
    z, x_T = torch.randn(1, Z), torch.randn(1, 3, SIZE, SIZE)
    reference = pipe.decode(z, x_T, num_inference_steps=3)
    pipe.to(dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    out = pipe.decode(z, x_T, num_inference_steps=3)
    assert out.dtype == torch.float32
    assert (out - reference).abs().mean() < 0.05  # random tiny UNet: bf16 rounding, not a different result
