"""StyleGANIPLPipeline end to end on CPU: a tiny StyleGAN2 + the tiny CLIP, every prompt scheme,
sampling with fixed seeds, translation of real images, save / load in a fresh process, push."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from ipl_diffusion.adaptation.distributed import make_accelerator
from ipl_diffusion.configs import GANStage2Config
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator
from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

STYLE_DIM = 16
FAST = dict(stage1_num_images=8, stage1_iterations=2, stage1_batch_size=4, iterations=2, auto_layer_batch=2, num_sample_images=3, label_templates="single", progress=False)
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny latency-bound models (conftest.py)


def tiny_generator(seed=0):
    torch.manual_seed(seed)
    return StyleGAN2Generator(size=32, style_dim=STYLE_DIM, n_mlp=2, channel_max=8).eval()


@pytest.fixture
def pipe(tiny_clip):
    clip, tokenizer = tiny_clip
    return StyleGANIPLPipeline.from_components(tiny_generator(), clip, tokenizer, CLIPImageProcessor(), source_label="photo")


def _owner(param_name):
    parts = param_name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("convs", "to_rgbs", "style") else parts[0]


@pytest.mark.parametrize("scheme", ["adaptive", "learned", "random", "manual"])
def test_adapt_every_scheme(pipe, scheme):
    adapted = pipe.adapt("sketch", scheme=scheme, **FAST)
    assert adapted is not pipe and pipe.generator is None  # the source pipeline is unchanged
    assert adapted.config.target_label == "sketch" and adapted.config.source_label == "photo"
    cfg = adapted.adaptation_config
    assert cfg["stage1"]["scheme"] == scheme and cfg["stage2"]["iterations"] == 2
    assert adapted.sample_grid.width >= 3 * 96 and 2 * 96 <= adapted.sample_grid.height < 3 * 96
    # only StyledConvs moved (adaptive layer selection; no mapping, ToRGB or constant)
    src = dict(pipe.source_generator.named_parameters())
    changed = {_owner(n) for n, p in adapted.generator.named_parameters() if not torch.equal(p, src[n])}
    assert changed and all(name == "conv1" or name.startswith("convs.") for name in changed)
    expected_module = {"adaptive": "LatentMapper", "random": "LatentMapper", "learned": "SharedPromptContext", "manual": "SharedPromptContext"}
    assert type(adapted.mapper).__name__ == expected_module[scheme]


def test_adapt_fixed_phase_and_checkpoint_resume(pipe, tmp_path, monkeypatch):
    kwargs = dict(FAST, auto_layer_iters=0, phase="shape", output_dir=str(tmp_path), checkpointing_steps=1, sample_steps=1)
    first = pipe.adapt("sketch", **kwargs)
    src = dict(pipe.source_generator.named_parameters())
    changed = {_owner(n) for n, p in first.generator.named_parameters() if not torch.equal(p, src[n])}
    assert changed == {"input", "conv1", "convs.0", "convs.1"}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    assert (tmp_path / "samples" / "step_000002.png").is_file() and (tmp_path / "sample_grid.png").is_file()
    assert (tmp_path / "stage1" / "options.json").is_file()
    # resuming a finished run trains nothing more (Stage 1 is reloaded, not re-learned)
    # and gives the same generator
    import ipl_diffusion.prompt_learning

    def no_relearning(*args, **kwargs):
        raise AssertionError("Stage 1 ran again on resume")

    monkeypatch.setattr(ipl_diffusion.prompt_learning, "learn_prompts", no_relearning)
    # an accelerator passed in is the one used (the default is made the same way)
    again = pipe.adapt("sketch", **dict(kwargs, resume_from_checkpoint="latest", accelerator=make_accelerator("no", "cpu")))
    assert again.adaptation_config["num_processes"] == 1
    for (name, p), q in zip(first.generator.named_parameters(), again.generator.parameters()):
        assert torch.equal(p, q), name


def test_resume_with_another_stage1_option_is_refused_before_stage1_rewrites_anything(pipe, tmp_path):
    from ipl_diffusion.errors import UserError

    kwargs = dict(FAST, auto_layer_iters=0, phase="shape", output_dir=str(tmp_path), checkpointing_steps=1)
    pipe.adapt("sketch", **kwargs)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="stage1.domain_regularizer was 'feature' there, 'direction' now"):
        pipe.adapt("sketch", **dict(kwargs, resume_from_checkpoint="latest", domain_regularizer="direction"))
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing rewritten, Stage 1's result included


def test_overwrite_replaces_the_earlier_checkpoints_only_once_the_run_can_start(pipe, tmp_path):
    from ipl_diffusion.errors import UserError

    kwargs = dict(FAST, auto_layer_iters=0, phase="shape", output_dir=str(tmp_path), checkpointing_steps=1)
    pipe.adapt("sketch", **kwargs)
    (tmp_path / "checkpoints" / "notes.txt").write_text("not a checkpoint\n")
    earlier = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds checkpoints"):  # a fresh run over them
        pipe.adapt("sketch", **dict(kwargs, seed=1))
    with pytest.raises(UserError, match="too long"):  # refused with overwrite: nothing lost
        pipe.adapt(" ".join(["sketch"] * 100), **dict(kwargs, seed=1), overwrite=True)
    with pytest.raises(UserError, match="leave no room for a label"):  # Stage 1's n_ctx, checked before too
        pipe.adapt("sketch", **dict(kwargs, seed=1, n_ctx=100), overwrite=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == earlier
    pipe.adapt("sketch", **dict(kwargs, seed=1, iterations=1), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-1", "notes.txt"]
    meta = json.loads((tmp_path / "checkpoints" / "checkpoint-1" / "checkpoint.json").read_text())
    assert meta["config"]["stage2"]["seed"] == 1  # the new run's, not the earlier one's


def test_adapt_errors(pipe):
    with pytest.raises(ValueError, match="scheme"):
        pipe.adapt("sketch", scheme="fancy", **{k: v for k, v in FAST.items()})
    with pytest.raises(ValueError):
        pipe.adapt("", **FAST)  # empty label
    bare = StyleGANIPLPipeline(source_generator=tiny_generator())
    with pytest.raises(ValueError, match="text_encoder"):
        bare.adapt("sketch")
    with pytest.raises(ValueError, match="fp16.*GPU"):  # the tiny pipeline is on the CPU (GPU or not)
        pipe.adapt("sketch", mixed_precision="fp16", **FAST)


def test_recorded_adapt_defaults_and_known_domains(pipe, tmp_path):
    """config.adapt_defaults fills the options a call leaves out (explicit ones win) and
    config.known_domains makes adapt refuse other labels; both survive save/load."""
    pipe.register_to_config(
        adapt_defaults=dict(iterations=1, batch_size=2, stage1_num_images=4, stage1_iterations=2, stage1_batch_size=4),
        known_domains=["photo", "sketch"],
    )
    pipe.save_pretrained(tmp_path / "p")
    loaded = StyleGANIPLPipeline.from_pretrained(str(tmp_path / "p"))
    assert loaded.config.known_domains == ["photo", "sketch"]
    fixed = dict(label_templates="single", auto_layer_batch=2, num_sample_images=3, progress=False)
    adapted = loaded.adapt("sketch", **fixed)
    cfg = adapted.adaptation_config
    assert cfg["stage2"]["iterations"] == 1 and cfg["stage1"]["stage1_num_images"] == 4
    assert adapted.config.adapt_defaults == loaded.config.adapt_defaults
    assert loaded.adapt("sketch", iterations=2, **fixed).adaptation_config["stage2"]["iterations"] == 2
    with pytest.raises(ValueError, match="trained only on the domains photo, sketch") as far_off:
        loaded.adapt("Wall painting")
    assert "did you mean" not in str(far_off.value)
    with pytest.raises(ValueError, match=r"'skech' is not one of them \(did you mean 'sketch'\?\)"):
        loaded.adapt("skech")  # the API suggests as the command line does


def test_sampling_is_seeded_and_source_matches_generator(pipe):
    a = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    c = pipe(num_images=2, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert a.shape == (2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    z = torch.randn(2, STYLE_DIM, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = pipe.source_generator([z], truncation=0.7, truncation_latent=pipe.source_generator.mean_latent(), randomize_noise=False)
    torch.testing.assert_close(a, ((ref.clamp(-1, 1) + 1) / 2))
    pil = pipe(num_images=1, generator=torch.Generator().manual_seed(0)).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)
    assert pipe(num_images=1, output_type="np").images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        pipe(latents=torch.full((1, STYLE_DIM), float("nan")))


def test_translate_real_images(pipe, tmp_path):
    adapted = pipe.adapt("sketch", **FAST)
    rgba = Image.new("RGBA", (50, 40), (200, 10, 10, 128))
    gray = Image.new("L", (20, 30), 90)
    rgba.save(tmp_path / "a.png")
    out = adapted.translate([tmp_path / "a.png", gray], num_steps=3)
    assert len(out) == 2 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in out)
    images, w_plus = adapted.translate([gray], num_steps=3, output_type="pt", return_latents=True)
    assert w_plus.shape == (1, adapted.source_generator.n_latent, STYLE_DIM)
    # the translation is the adapted generator applied to the source projection
    with torch.no_grad():
        expected, _ = adapted.generator(w_plus, input_is_latent=True, randomize_noise=False)
    torch.testing.assert_close(images, (expected.clamp(-1, 1) + 1) / 2)
    # deterministic for a seed
    again, w2 = adapted.translate([gray], num_steps=3, output_type="pt", return_latents=True)
    torch.testing.assert_close(w2, w_plus)


def test_from_components_reads_rosinality_pt(tmp_path, tiny_clip):
    g = tiny_generator(5)
    torch.save({"g_ema": g.state_dict(), "args": argparse.Namespace(size=32, latent=STYLE_DIM, n_mlp=2, channel_multiplier=2)}, tmp_path / "g.pt")
    pipe = StyleGANIPLPipeline.from_components(tmp_path / "g.pt", *tiny_clip)
    assert pipe.source_generator.config.size == 32 and pipe.config.base_model == str(tmp_path / "g.pt")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        StyleGANIPLPipeline.from_pretrained(tmp_path)
    # a converted generator folder / .pt is accepted by from_pretrained (CLIP given explicitly)
    g.save_pretrained(tmp_path / "converted")
    for source in (tmp_path / "converted", tmp_path / "g.pt"):
        loaded = StyleGANIPLPipeline.from_pretrained(source, text_encoder=tiny_clip[0], tokenizer=tiny_clip[1])
        assert loaded.generator is None and loaded.source_generator.config.size == 32
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StyleGANIPLPipeline.from_components(tmp_path / "missing", *tiny_clip)
    # offline and no local CLIP: a clear error naming the CLIP component
    with pytest.raises(FileNotFoundError, match="CLIP model"):
        StyleGANIPLPipeline.from_pretrained(tmp_path / "converted")


@pytest.mark.parametrize("dtype, generator_dtype, clip_dtype", [
    ({"dtype": torch.bfloat16}, torch.bfloat16, torch.bfloat16),
    ({"torch_dtype": torch.bfloat16}, torch.bfloat16, torch.bfloat16),
    ({"dtype": {"source_generator": torch.bfloat16}}, torch.bfloat16, torch.float32),  # no "default": float32
    ({"dtype": "bfloat16"}, torch.float32, torch.float32),  # diffusers loads a string as float32
], ids=["dtype", "torch_dtype", "dict", "string"])
def test_bare_generator_folder_loads_in_the_dtype_asked_for(tmp_path, tiny_clip, dtype, generator_dtype, clip_dtype):
    """A bare generator folder (``ipl convert stylegan2`` output) loaded with ``dtype`` casts what
    it loads, generator and CLIP folder, by diffusers' rules; a CLIP passed as an object is the
    caller's and stays as it is."""
    tiny_generator(5).save_pretrained(tmp_path / "converted")
    tiny_clip[0].save_pretrained(tmp_path / "clip")
    tiny_clip[1].save_pretrained(tmp_path / "clip")
    loaded = StyleGANIPLPipeline.from_pretrained(tmp_path / "converted", text_encoder=tmp_path / "clip", **dtype)
    assert loaded.source_generator.dtype == generator_dtype and loaded.text_encoder.dtype == clip_dtype
    passed = StyleGANIPLPipeline.from_pretrained(tmp_path / "converted", text_encoder=tiny_clip[0], tokenizer=tiny_clip[1], **dtype)
    assert passed.source_generator.dtype == generator_dtype and passed.text_encoder.dtype == torch.float32
    if isinstance(dtype.get("dtype"), str):  # as diffusers says for a folder it loads
        with pytest.warns(UserWarning, match="Passed dtype bfloat16 is not a torch.dtype. Defaulting to torch.float32"):
            StyleGANIPLPipeline.from_pretrained(tmp_path / "converted", text_encoder=None, **dtype)
    with pytest.warns(UserWarning, match=r"\{'device_map': 'cpu'\} are not expected .* will be ignored"):
        StyleGANIPLPipeline.from_pretrained(tmp_path / "converted", text_encoder=tiny_clip[0], tokenizer=tiny_clip[1], device_map="cpu")


FRESH_PROCESS = """
import sys, numpy as np, torch
from ipl_diffusion import StyleGANIPLPipeline
pipe = StyleGANIPLPipeline.from_pretrained(sys.argv[1])
out = pipe(num_images=2, generator=torch.Generator().manual_seed(0), output_type="np").images
np.save(sys.argv[2], out)
print(type(pipe.generator).__name__, pipe.config.target_label, pipe.sample_grid is not None)
"""


def test_save_load_in_fresh_process(pipe, tmp_path):
    adapted = pipe.adapt("sketch", **FAST)
    adapted.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["generator"] == ["stylegan2", "StyleGAN2Generator"]  # diffusers' custom-code layout
    assert index["_class_name"] == ["pipeline_stylegan_ipl", "StyleGANIPLPipeline"] and index["target_label"] == "sketch"
    assert (tmp_path / "pipe" / "generator" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list((tmp_path / "pipe").rglob("*.bin")) and not list((tmp_path / "pipe").rglob("*.pt"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "pipe"), str(tmp_path / "out.npy")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "StyleGAN2Generator sketch True"
    expected = adapted(num_images=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)


def test_push_to_hub_offline(pipe, monkeypatch):
    import diffusers.utils.hub_utils as hub_utils

    calls = {}

    class Repo:
        repo_id = "me/tiny-sketch"

    def fake_create_repo(repo_id, **kwargs):
        calls["create"] = repo_id
        return Repo()

    def fake_upload_folder(repo_id, folder_path, **kwargs):
        calls["files"] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        calls["readme"] = (Path(folder_path) / "README.md").read_text()
        return "https://hub/commit"

    monkeypatch.setattr(hub_utils, "create_repo", fake_create_repo)
    monkeypatch.setattr(hub_utils, "upload_folder", fake_upload_folder)
    adapted = pipe.adapt("sketch", **FAST)
    assert adapted.push_to_hub("me/tiny-sketch") == "https://hub/commit"
    assert {"README.md", "pipeline_stylegan_ipl.py", "model_index.json", "sample_grid.png", "generator/config.json"} <= set(calls["files"])
    assert "photo → sketch" in calls["readme"] and "StyleGANIPLPipeline.from_pretrained" in calls["readme"]


@pytest.mark.slow
def test_cli_translate_stylegan2(pipe, tmp_path):
    from ipl_diffusion.cli import main

    pipe.save_pretrained(tmp_path / "pipe")
    (tmp_path / "in").mkdir()
    Image.new("RGB", (40, 32), (10, 200, 30)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    # no --backend: the folder's model_index.json says it is a StyleGAN pipeline
    code = main(["translate", "--model", str(tmp_path / "pipe"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    with Image.open(tmp_path / "out" / "a.png") as image:
        assert image.size == (32, 32)
    assert (tmp_path / "out" / "ipl_grid" / "translation.png").is_file()


def test_cli_sample_detects_the_backend(pipe, tmp_path):
    """``ipl sample --model <StyleGAN pipeline folder>`` without ``--backend stylegan2``."""
    from ipl_diffusion.cli import main

    pipe.save_pretrained(tmp_path / "pipe")
    assert main(["sample", "--model", str(tmp_path / "pipe"), "--output", str(tmp_path / "out"), "--num-images", "2", "--device", "cpu"]) == 0
    with Image.open(tmp_path / "out" / "sample_0001.png") as image:
        assert image.size == (32, 32)
    # an explicit --backend that contradicts the folder still gets the hint
    assert main(["sample", "--model", str(tmp_path / "pipe"), "--output", str(tmp_path / "out"), "--backend", "diffae"]) == 2


def test_cli_adapt_stylegan2(tmp_path):
    """``ipl adapt --backend stylegan2`` on a saved source pipeline (CLIP with room for the
    80 ImageNet templates, which the CLI's default label features use)."""
    from tiny_clip import build_clip

    from ipl_diffusion.cli import main

    clip, tokenizer = build_clip(max_position_embeddings=32)
    tokenizer.model_max_length = 32
    StyleGANIPLPipeline.from_components(tiny_generator(), clip, tokenizer, CLIPImageProcessor(), source_label="photo").save_pretrained(tmp_path / "source")
    argv = ["adapt", "--backend", "stylegan2", "--model", str(tmp_path / "source"), "--target", "sketch", "--output_dir", str(tmp_path / "run"),
            "--stage1_num_images", "4", "--stage1-iterations", "1", "--iterations", "2", "--batch-size", "2", "--device", "cpu", "--checkpointing-steps", "1"]
    assert main(argv) == 0
    adapted = StyleGANIPLPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert adapted.config.target_label == "sketch" and adapted.generator is not None
    assert adapted.adaptation_config["stage2"]["iterations"] == 2
    assert (tmp_path / "run" / "before_after.png").is_file() and (tmp_path / "run" / "checkpoints" / "checkpoint-2").is_dir()
    card = (tmp_path / "run" / "pipeline" / "README.md").read_text()
    assert f'from_pretrained("{tmp_path / "run" / "pipeline"}"' in card and ".tmp-" not in card  # loads what is there


def test_one_seed_governs_both_stages(pipe):
    """Same seed: the same mapper and g_ema bit for bit; another seed: another mapper; the
    seed is recorded (never null), and the API's default is the CLI's (0)."""
    import inspect

    assert GANStage2Config().seed == 0  # the API default, as the CLI's
    fixed = dict(FAST, stage1_num_images=None)  # fresh latents every Stage-1 iteration
    runs = [pipe.adapt("sketch", seed=s, **fixed) for s in (3, 3, 4)]
    weights = [({k: v.clone() for k, v in r.mapper.state_dict().items()}, r.generator.state_dict()) for r in runs]
    for a, b in zip(weights[0], weights[1]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(weights[0][0][k], weights[2][0][k]) for k in weights[0][0])
    cfg = runs[0].adaptation_config
    assert cfg["seed"] == 3 and cfg["stage2"]["seed"] == 3
    assert cfg["stage1"]["heldout_images"] == 256 and 0.0 <= cfg["stage1"]["heldout_retrieval"] <= 1.0
