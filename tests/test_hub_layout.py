"""Saved / pushed pipelines of both backends (and DiffAEPipeline) load with nothing but
``diffusers.DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (diffusers'
custom-component layout), our own classes still load them without running their code files,
and the model card carries the project URL, the grid, the run's numbers and a working snippet."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import CLIPImageProcessorPil

from diffae_tiny import diffae_scheduler, latent_scheduler, tiny_encoder, tiny_latent_net, tiny_unet
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator
from ipl_diffusion.pipelines.pipeline_diffae import DiffAEPipeline
from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline
from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline
from tiny_clip import build_clip
from tiny_ipl import FAST, SIZE, build_tiny_ipl_pipeline

REPO = Path(__file__).resolve().parents[1]
URL = "https://github.com/ipl-diffusion/ipl-diffusion"
GAN_FAST = dict(stage1_num_images=4, stage1_iterations=2, stage1_batch_size=4, iterations=2, auto_layer_batch=2, num_sample_images=3, label_templates="single", progress=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{name: (pipeline, folder)}``: an adapted Diff-IPL, an adapted GAN-IPL and a DiffAE pipeline, saved."""
    root = tmp_path_factory.mktemp("saved")
    images = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ipl = build_tiny_ipl_pipeline().adapt("sketch", images=images, **FAST)
    torch.manual_seed(0)
    clip, tokenizer = build_clip()
    generator = StyleGAN2Generator(size=32, style_dim=16, n_mlp=2, channel_max=8).eval()
    gan = StyleGANIPLPipeline.from_components(generator, clip, tokenizer, CLIPImageProcessorPil(), source_label="photo")
    gan = gan.adapt("sketch", **GAN_FAST)
    diffae = DiffAEPipeline(tiny_encoder(), tiny_unet(), diffae_scheduler(), tiny_latent_net(), latent_scheduler())
    pipes = {"ipl": ipl, "gan": gan, "diffae": diffae}
    for name, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(root / name)
    return {name: (pipe, root / name) for name, pipe in pipes.items()}


def test_model_index_uses_the_custom_component_layout(saved):
    expected = {
        "ipl": ("pipeline_ipl", "IPLPipeline", {"unet": "diffae_unet", "source_unet": "diffae_unet", "semantic_encoder": "semantic_encoder", "latent_net": "latent_net", "mapper": "mapper"}),
        "gan": ("pipeline_stylegan_ipl", "StyleGANIPLPipeline", {"generator": "stylegan2", "source_generator": "stylegan2", "mapper": "mapper"}),
        "diffae": ("pipeline_diffae", "DiffAEPipeline", {"unet": "diffae_unet", "semantic_encoder": "semantic_encoder", "latent_net": "latent_net"}),
    }
    for name, (module, class_name, components) in expected.items():
        folder = saved[name][1]
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == [module, class_name]
        assert f"import {class_name}" in (folder / f"{module}.py").read_text()
        for component, file in components.items():
            assert index[component][0] == file, (name, component)
            assert (folder / component / f"{file}.py").is_file(), (name, component)
        assert index["scheduler" if name != "gan" else "text_encoder"][0] in ("diffusers", "transformers")


# Runs in a fresh process outside the repository: the card's own snippet for the two adapted
# pipelines (it loads with DiffusionPipeline.from_pretrained(..., trust_remote_code=True)), and
# the DiffAE pipeline by hand.
PLAIN_DIFFUSERS = r"""
import json, os, re, sys
from pathlib import Path
import numpy as np, torch
from diffusers import DiffusionPipeline

root = Path(sys.argv[1])
report = {}
for name in ("ipl", "gan"):
    folder = root / name
    snippet = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    run_dir = root / f"run_{name}"
    run_dir.mkdir()
    os.chdir(run_dir)
    scope = {}
    exec(snippet, scope)
    out = scope.get("samples") or scope.get("images")
    report[name] = dict(cls=type(scope["pipe"]).__name__, samples=len(out), translated=len(scope["translated"]), size=list(scope["translated"][0].size))
try:
    DiffusionPipeline.from_pretrained(root / "diffae")
    report["untrusted"] = "loaded"
except ValueError as err:
    report["untrusted"] = str(err)
pipe = DiffusionPipeline.from_pretrained(root / "diffae", trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
out = pipe(batch_size=2, num_inference_steps=2, latent_num_inference_steps=2, output_type="np", seed=0).images
np.save(root / "diffae_out.npy", out)
report["diffae"] = dict(cls=type(pipe).__name__, unet=type(pipe.unet).__name__)
print(json.dumps(report))
"""


def test_plain_diffusers_loads_and_runs_every_saved_pipeline(saved, tmp_path):
    root = tmp_path / "hub"
    for name, (_, folder) in saved.items():
        shutil.copytree(folder, root / name)
        card = (root / name / "README.md")
        if card.is_file():  # the snippet names the folder it was saved to; point it at the copy
            card.write_text(card.read_text().replace(str(folder), str(root / name)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(root)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ipl"] == dict(cls="IPLPipeline", samples=4, translated=1, size=[SIZE, SIZE])
    assert report["gan"] == dict(cls="StyleGANIPLPipeline", samples=4, translated=1, size=[32, 32])
    assert report["diffae"] == dict(cls="DiffAEPipeline", unet="DiffAEUNetModel")
    assert "trust_remote_code=True" in report["untrusted"]
    # the loaded weights are the saved ones: same seed, same images
    for name in ("ipl", "gan"):
        pipe = saved[name][0]
        expected = pipe(num_images=4, generator=torch.Generator().manual_seed(0), output_type="pil").images[0]
        with Image.open(root / f"run_{name}" / "sample.png") as image:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
    diffae = saved["diffae"][0](batch_size=2, num_inference_steps=2, latent_num_inference_steps=2, output_type="np", seed=0).images
    np.testing.assert_allclose(np.load(root / "diffae_out.npy"), diffae, atol=1e-5)  # thread counts differ


def test_package_classes_load_both_layouts_without_running_code_files(saved, tmp_path):
    folder = tmp_path / "ipl"
    shutil.copytree(saved["ipl"][1], folder)
    for code in folder.rglob("*.py"):  # our loaders must not import these
        code.write_text("raise RuntimeError('code file ran')\n")
    loaded = IPLPipeline.from_pretrained(folder)
    assert type(loaded.unet).__module__ == "ipl_diffusion.models.diffae_unet"
    assert loaded.config.target_label == "sketch" and loaded.sample_grid is not None
    # a folder written before the layout (class name as a string, components by module path)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "IPLPipeline"
    for name in ("unet", "source_unet"):
        index[name] = ["ipl_diffusion.models.diffae_unet", "DiffAEUNetModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    for code in folder.rglob("*.py"):
        code.unlink()
    assert IPLPipeline.from_pretrained(folder).config.target_label == "sketch"
    gan = StyleGANIPLPipeline.from_pretrained(saved["gan"][1])
    assert type(gan.generator).__name__ == "StyleGAN2Generator" and gan.config.run_summary["stage2_iterations"] == 2
    assert DiffAEPipeline.from_pretrained(saved["diffae"][1]).latent_net is not None


def test_code_file_without_the_package_says_how_to_install(saved, tmp_path):
    """A user without ipl-diffusion gets an ImportError naming the pip command, not a bare
    ModuleNotFoundError (the package is hidden from the import system here)."""
    code = saved["ipl"][1] / "unet" / "diffae_unet.py"
    script = "import sys, runpy\nsys.modules['ipl_diffusion'] = None\nrunpy.run_path(sys.argv[1])\n"
    result = subprocess.run([sys.executable, "-c", script, str(code)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "ImportError: this pipeline's code is the ipl-diffusion package" in result.stderr
    assert "pip install ipl-diffusion" in result.stderr and URL in result.stderr


@pytest.mark.parametrize("name", ["ipl", "gan"])
def test_push_uploads_the_layout_and_a_card(saved, name, monkeypatch, tmp_path):
    import diffusers.utils.hub_utils as hub_utils

    pipe, _ = saved[name]
    calls = {}

    class Repo:
        repo_id = "me/tiny-sketch"

    def fake_create_repo(repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return Repo()

    def fake_upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        calls["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        calls["upload"] = kwargs
        shutil.copytree(folder, tmp_path / "repo")
        return "https://huggingface.co/me/tiny-sketch/commit/0"

    monkeypatch.setattr(hub_utils, "create_repo", fake_create_repo)
    monkeypatch.setattr(hub_utils, "upload_folder", fake_upload_folder)
    assert pipe.push_to_hub("me/tiny-sketch", private=True).endswith("/commit/0")
    assert calls["create_repo"] == ("me/tiny-sketch", {"private": True, "token": None, "exist_ok": True})
    assert calls["upload"]["repo_id"] == "me/tiny-sketch"
    files = calls["files"]
    module, generator = ("pipeline_ipl", "unet/diffae_unet.py") if name == "ipl" else ("pipeline_stylegan_ipl", "generator/stylegan2.py")
    assert {"README.md", "sample_grid.png", "model_index.json", f"{module}.py", generator, "mapper/mapper.py"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".ckpt"))]  # no pickles
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "mit" and "ipl" in card.data.tags
    assert card.data.base_model is None  # not a Hub id: the Hub would refuse the card's metadata
    text = card.text
    assert f"]({URL})" in text and "](https://github.com/)" not in text
    assert "![samples](sample_grid.png)" in text and "`photo`" in text and "`sketch`" in text
    summary = pipe.config.run_summary
    assert f"Stage 2: 2 iterations, loss {summary['stage2_loss_first']:.4f}" in text
    assert "| stage2 | `iterations` | `2` |" in text and "| stage1 | `scheme` | `adaptive` |" in text
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert 'DiffusionPipeline.from_pretrained("me/tiny-sketch", trust_remote_code=True)' in snippet


def test_card_metadata_names_only_hub_ids_as_base_model():
    from ipl_diffusion.pipelines.model_card import _hub_base_model

    assert _hub_base_model("openai/some-diffae") == "openai/some-diffae"
    for not_an_id in ("ipl-diffusion/shapes-stylegan2 (shipped)", str(REPO), "tiny-random-diffae", "a/b/c", None):
        assert _hub_base_model(not_an_id) is None, not_an_id


def test_project_url_comes_from_the_installed_metadata(monkeypatch):
    import importlib.metadata
    from email.message import Message

    from ipl_diffusion.pipelines import hub_layout

    assert hub_layout.project_url() == URL  # installed metadata, else this checkout's setup.cfg
    metadata = Message()
    metadata["Project-URL"] = "Source, https://example.org/fork"
    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: metadata)
    assert hub_layout.project_url() == "https://example.org/fork"
    metadata["Home-page"] = "https://example.org/home"
    assert hub_layout.project_url() == "https://example.org/home"


def test_hub_ids_are_loaded_from_their_snapshot(saved, monkeypatch):
    """A Hub id goes through huggingface_hub.snapshot_download (mocked: no network) and loads
    as a folder; diffusers' own download step would ask for trust_remote_code."""
    import huggingface_hub

    asked = []

    def fake_snapshot_download(repo_id, **kwargs):
        asked.append((repo_id, kwargs))
        return str(saved[{"me/ipl": "ipl", "me/gan": "gan", "me/diffae": "diffae"}[repo_id]][1])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert IPLPipeline.from_pretrained("me/ipl").config.target_label == "sketch"
    assert StyleGANIPLPipeline.from_pretrained("me/gan", revision="v1").generator is not None
    assert DiffAEPipeline.from_pretrained("me/diffae").unet is not None
    assert [a[0] for a in asked] == ["me/ipl", "me/gan", "me/diffae"]
    assert asked[1][1] == {"local_files_only": True, "revision": "v1"}  # HF_HUB_OFFLINE=1 in tests


def test_card_says_when_stage1_used_the_direction_regulariser_instead_of_eq5():
    from diffusers.configuration_utils import FrozenDict

    from ipl_diffusion.pipelines.model_card import build_model_card

    def card_text(stage1):
        config = FrozenDict(source_label="photo", target_label="sketch", base_model=None, run_summary=None,
                            adaptation={"stage1": stage1})
        pipe = type("Pipe", (), {"config": config, "sample_grid": None})()
        return build_model_card(pipe, "me/x", "t", "d", ["ipl"], "g", "print(1)").text

    assert "not in the paper" in card_text({"scheme": "adaptive", "domain_regularizer": "direction"})
    assert "not in the paper" not in card_text({"scheme": "adaptive", "domain_regularizer": "feature"})
    assert "not in the paper" not in card_text({"scheme": "adaptive"})  # cards of runs from before the option
    assert "not in the paper" not in card_text({"scheme": "manual", "domain_regularizer": "direction"})  # no Stage 1 ran
