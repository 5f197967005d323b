"""The `ipl` command line: adapt, translate, sample, push (help texts, outputs, one-line errors)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipl_diffusion.cli import main
from tiny_ipl import FAST_CLI_ARGS, SIZE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapted_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sketch"
    assert main(["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out), *FAST_CLI_ARGS]) == 0
    return out


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 24, 3), dtype=np.uint8)).save(folder / "wide.jpg")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), "L").save(folder / "gray.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("not an image at all")
    return folder


def test_help_texts():
    for command in ("adapt", "translate", "sample", "push", "demo"):
        result = subprocess.run(
            [sys.executable, "-m", "ipl_diffusion.cli", command, "--help"],
            capture_output=True, text=True, cwd=REPO, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert "examples:" in result.stdout and "--model" in result.stdout
    result = subprocess.run([sys.executable, "-m", "ipl_diffusion.cli", "--help"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    for command in ("adapt", "translate", "sample", "convert", "push"):
        assert command in result.stdout


def adapt_help(capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["adapt", "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_boolean_options_are_plain_switches_in_help_and_still_take_a_value(capsys):
    from ipl_diffusion.cli import build_parser

    text = adapt_help(capsys)
    assert "[--overwrite]" in text and "\n  --overwrite  " in text and "[--low_memory]" in text
    assert re.search(r"--\w+ \[[A-Z0-9_]+\]", text) is None, re.search(r"--\w+ \[[A-Z0-9_]+\]", text)
    parser = build_parser()
    parser.format_help()  # the switches take their value again once the help is written
    assert parser.parse_args(["adapt", "--overwrite"]).overwrite is True
    assert parser.parse_args(["adapt", "--overwrite", "false"]).overwrite is False
    assert parser.parse_args(["adapt", "--cache_image_features", "no"]).cache_image_features is False


NO_WARNING_SCRIPT = """
import sys
from ipl_diffusion.cli import main
model, clip, run, images = sys.argv[1:5]
assert main(["adapt", "--model", model, "--target", "sketch", "--output_dir", run, *sys.argv[5:]]) == 0
assert main(["evaluate", "--adapted", images, "--clip-model", clip, "--target-label", "sketch",
             "--metrics", "clip_score", "--clip-templates", "single", "--size", "32"]) == 0
"""


def test_commands_print_no_torchvision_warning(model_dir, tiny_clip, tmp_path):
    """transformers warns that CLIPImageProcessor "requires torchvision" whenever that name is
    used without torchvision; every CLIP image processor we build is the PIL one."""
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision is installed here, so transformers never warns about it")
    except ImportError:
        pass
    from transformers import CLIPImageProcessorPil

    clip, tokenizer = tiny_clip
    for part in (clip, tokenizer, CLIPImageProcessorPil(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32})):
        part.save_pretrained(tmp_path / "clip")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "images" / "a.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    argv = [str(model_dir), str(tmp_path / "clip"), str(tmp_path / "run"), str(tmp_path / "images"), *FAST_CLI_ARGS]
    result = subprocess.run([sys.executable, "-c", NO_WARNING_SCRIPT, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torchvision" not in result.stderr, result.stderr[-3000:]


def test_adapt_writes_pipeline_grid_and_config(adapted_dir):
    assert (adapted_dir / "pipeline" / "model_index.json").is_file()
    assert (adapted_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    grid = Image.open(adapted_dir / "before_after.png")
    assert grid.width >= 4 * 96 and grid.height >= 3 * 96  # 4 labelled columns, 3 rows, tiles upscaled
    config = json.loads((adapted_dir / "run_config.json").read_text())
    assert config["target"] == "sketch" and config["stage2"]["iterations"] == 1 and config["num_source_images"] == 4


def test_translate_folder_keeps_names_and_skips_bad_files(adapted_dir, photos, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    out = tmp_path / "out"
    rc = main(["translate", "--model", str(adapted_dir / "pipeline"), "--input", str(photos), "--output", str(out),
               "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "skipped broken.png" in printed
    assert sorted(p.name for p in out.iterdir()) == ["gray.png", "ipl_grid", "wide.jpg"]
    assert Image.open(out / "wide.jpg").size == (SIZE, SIZE)
    assert Image.open(out / "ipl_grid" / "translation.png").size == (2 * SIZE, 2 * SIZE)
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before  # inputs untouched
    # a second run into the same folder would replace the translations: refused, files kept
    (out / "gray.png").write_bytes(b"an earlier result")
    args = ["translate", "--model", str(adapted_dir / "pipeline"), "--input", str(photos), "--output", str(out)]
    assert main(args) == 2
    assert "already holds gray.png, wide.jpg" in capsys.readouterr().err
    assert (out / "gray.png").read_bytes() == b"an earlier result"
    assert main([*args, "--overwrite", "--device", "cpu"]) == 0
    assert Image.open(out / "gray.png").size == (SIZE, SIZE)


def test_translate_refuses_to_write_into_the_input_folder(adapted_dir, photos, capsys):
    rc = main(["translate", "--model", str(adapted_dir / "pipeline"), "--input", str(photos), "--output", str(photos)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ipl translate: error:") and "input folder" in err and "\n" not in err


def test_errors_are_one_line(model_dir, tmp_path, capsys):
    rc = main(["adapt", "--model", str(model_dir), "--target", "sketch", "--images", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "nope" in err and "\n" not in err and "Traceback" not in err
    rc = main(["translate", "--model", str(tmp_path / "no-model"), "--input", str(tmp_path), "--output",
               str(tmp_path / "o")])
    assert rc == 2
    capsys.readouterr()
    # a missing local folder is named as such, not judged by the Hub's repo-id rules
    assert main(["sample", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "pipeline folder" in err and "does not exist" in err


def test_the_package_warnings_are_one_line_and_other_libraries_keep_their_location(capsys):
    import warnings

    import ipl_diffusion.outputs
    from ipl_diffusion.cli import one_line_warnings

    # pytest.warns records what reaches Python's own warning display
    with pytest.warns(UserWarning) as shown_by_python, one_line_warnings("ipl adapt"):
        # as output_lock warns of a killed run's lock (its stacklevel lands in package code)
        warnings.warn_explicit("the run that held it is no longer running", UserWarning, ipl_diffusion.outputs.__file__, 184)
        warnings.warn_explicit("a torch warning", UserWarning, "/site-packages/torch/nn/x.py", 7)
    assert capsys.readouterr().err == "ipl adapt: warning: the run that held it is no longer running\n"
    assert [(str(w.message), w.filename, w.lineno) for w in shown_by_python] == [
        ("a torch warning", "/site-packages/torch/nn/x.py", 7)]
    # an example script's own warnings too, but not those of files beside it (a .venv there)
    script = REPO / "examples" / "train_ipl_diffae.py"
    beside = REPO / "examples" / ".venv" / "lib" / "numpy" / "core.py"
    with pytest.warns(UserWarning) as shown_by_python, one_line_warnings("train_ipl_diffae.py", also_from=script):
        warnings.warn_explicit("mixed precision on a CPU", UserWarning, str(script), 60)
        warnings.warn_explicit("Mean of empty slice", UserWarning, str(beside), 7)
    assert capsys.readouterr().err == "train_ipl_diffae.py: warning: mixed precision on a CPU\n"
    assert [str(w.message) for w in shown_by_python] == ["Mean of empty slice"]
    # outside the CLI nothing changes
    with pytest.warns(UserWarning, match="no longer running"):
        warnings.warn_explicit("no longer running", UserWarning, ipl_diffusion.outputs.__file__, 184)


def test_sample_is_seeded(adapted_dir, tmp_path):
    for name in ("a", "b"):
        assert main(["sample", "--model", str(adapted_dir / "pipeline"), "--output", str(tmp_path / name),
                     "--num-images", "2", "--steps", "4", "--device", "cpu"]) == 0
    a = np.asarray(Image.open(tmp_path / "a" / "sample_0001.png"))
    assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / "sample_0001.png")))
    assert (tmp_path / "a" / "samples_grid.png").is_file()


@pytest.mark.parametrize("backend", ["stylegan2", "diffae"])
def test_sample_reads_a_copy_of_a_shipped_folder_without_its_clip(backend, tmp_path, monkeypatch):
    """A shipped Shapes folder keeps no CLIP of its own; sampling never reads CLIP, so a copy of
    the folder (and, offline, a bare generator, whose CLIP would be the Hub's) samples as the
    original does."""
    import shutil

    from ipl_diffusion.shapes import default_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(default_model_path(backend), tmp_path / "copy")
    models = {"shipped": default_model_path(backend), "copy": tmp_path / "copy"}
    if backend == "stylegan2":
        from ipl_diffusion.models.stylegan2 import StyleGAN2Generator

        StyleGAN2Generator.from_pretrained(tmp_path / "copy" / "source_generator").save_pretrained(tmp_path / "bare")
        models["bare"] = tmp_path / "bare"
    for name, model in models.items():  # the backend read from the folder, a bare generator's too
        assert main(["sample", "--model", str(model), "--output", str(tmp_path / f"out_{name}"),
                     "--num-images", "2", "--steps", "4", "--device", "cpu"]) == 0, name
    shipped = np.asarray(Image.open(tmp_path / "out_shipped" / "sample_0001.png"))
    for name in models:
        assert np.array_equal(shipped, np.asarray(Image.open(tmp_path / f"out_{name}" / "sample_0001.png"))), name


def test_push_is_stubbed_and_uploads_the_card(adapted_dir, monkeypatch, capsys):
    import diffusers.utils.hub_utils as hub_utils

    uploaded = {}

    class Repo:
        repo_id = "me/sketch"

    monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kw: Repo())

    def fake_upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded["files"] = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        uploaded["readme"] = (folder / "README.md").read_text()
        return "https://huggingface.co/me/sketch/commit/1"

    monkeypatch.setattr(hub_utils, "upload_folder", fake_upload_folder)
    assert main(["push", "--model", str(adapted_dir / "pipeline"), "--repo-id", "me/sketch"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert {"README.md", "pipeline_ipl.py", "sample_grid.png", "model_index.json"} <= set(uploaded["files"])
    assert "`sketch`" in uploaded["readme"]


def test_default_model_is_the_embedded_shapes_model(tmp_path):
    """`ipl adapt --target sketch` with no --model: the README's main-job command."""
    out = tmp_path / "sketch"
    assert main(["adapt", "--target", "sketch", "--output_dir", str(out), *FAST_CLI_ARGS]) == 0
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "before_after.png").is_file()
    config = json.loads((out / "run_config.json").read_text())
    assert config["target"] == "sketch" and config["stage1"]["scheme"] == "adaptive"


@pytest.mark.slow
def test_stylegan2_default_is_the_embedded_shapes_gan(tmp_path):
    """`ipl adapt --backend stylegan2 --target sketch` with no --model (GAN-IPL on the Shapes GAN)."""
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    out = tmp_path / "gan-sketch"
    args = ["--stage1-iterations", "2", "--iterations", "2", "--batch-size", "2", "--stage1_num_images", "4", "--device", "cpu"]
    assert main(["adapt", "--backend", "stylegan2", "--target", "sketch", "--output_dir", str(out), *args]) == 0
    adapted = StyleGANIPLPipeline.from_pretrained(str(out / "pipeline"))
    assert adapted.is_adapted and adapted.config.target_label == "sketch"
    assert (out / "before_after.png").is_file()


def test_adapt_takes_the_clip_of_a_copied_shipped_folder_from_clip_model(tmp_path, capsys, monkeypatch):
    """A copy of a shipped Shapes folder stores no CLIP: ``--clip_model`` supplies it, and the
    run adapts exactly as the shipped folder does; without it the refusal names the option."""
    import shutil

    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline
    from ipl_diffusion.shapes import default_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(default_model_path("stylegan2"), tmp_path / "copy")
    args = ["--target", "sketch", "--stage1_iterations", "2", "--iterations", "1", "--batch_size", "2",
            "--stage1_num_images", "4", "--num_sample_images", "2", "--device", "cpu"]
    assert main(["adapt", "--model", str(tmp_path / "copy"), "--output_dir", str(tmp_path / "no"), *args]) == 2
    assert "`--clip_model CLIP` to ipl adapt" in capsys.readouterr().err
    assert main(["adapt", "--model", str(tmp_path / "copy"), "--clip_model", str(tmp_path / "none"),
                 "--output_dir", str(tmp_path / "no"), *args]) == 2
    assert "--clip_model: Could not load the CLIP model: the folder" in capsys.readouterr().err  # no Hub advice
    assert main(["adapt", "--model", str(tmp_path / "copy"), "--clip_model", "", "--output_dir", str(tmp_path / "no"), *args]) == 2
    assert "--clip_model is empty" in capsys.readouterr().err
    shutil.copytree(default_model_path("clip"), tmp_path / "clip")
    (tmp_path / "clip" / "model.safetensors").write_bytes(b"truncated")
    assert main(["adapt", "--model", str(tmp_path / "copy"), "--clip_model", str(tmp_path / "clip"),
                 "--output_dir", str(tmp_path / "no"), *args]) == 2
    assert "from the local folder" in capsys.readouterr().err  # a corrupt file: one line, not a traceback
    bare = tmp_path / "copy" / "source_generator"  # a bare generator's CLIP is the Hub's, not here offline
    assert main(["adapt", "--model", str(bare), "--output_dir", str(tmp_path / "no"), *args]) == 2
    assert capsys.readouterr().err.rstrip().endswith("e.g. `--clip_model ./clip`.")
    clip = str(default_model_path("clip"))
    assert main(["adapt", "--model", str(tmp_path / "copy"), "--clip_model", clip, "--output_dir", str(tmp_path / "c"), *args]) == 0
    assert main(["adapt", "--backend", "stylegan2", "--output_dir", str(tmp_path / "s"), *args]) == 0
    assert json.loads((tmp_path / "c" / "run_config.json").read_text())["args"]["clip_model"] == clip
    copied, shipped = (StyleGANIPLPipeline.from_pretrained(str(tmp_path / run / "pipeline")) for run in ("c", "s"))
    assert copied.config.known_domains == shipped.config.known_domains == ["photo", "sketch", "neon", "pixel art", "mosaic"]
    source = shipped.source_generator.state_dict()
    assert any(not torch.equal(value, source[name]) for name, value in shipped.generator.state_dict().items())  # it adapted
    for name, value in shipped.generator.state_dict().items():
        assert torch.equal(value, copied.generator.state_dict()[name]), name
    # another CLIP (here a copy of the Shapes one, which the package cannot recognise) may know
    # any label: the shipped folder's known_domains no longer apply
    shutil.rmtree(tmp_path / "clip")
    shutil.copytree(default_model_path("clip"), tmp_path / "clip")
    other = [a if a != "sketch" else "Wall painting" for a in args]
    assert main(["adapt", "--backend", "stylegan2", "--clip_model", str(tmp_path / "clip"), "--output_dir", str(tmp_path / "w"), *other]) == 0
    assert StyleGANIPLPipeline.from_pretrained(str(tmp_path / "w" / "pipeline")).config.known_domains is None


def test_shapes_defaults_refuse_unknown_labels_before_loading(tmp_path, capsys):
    for backend in ("diffae", "stylegan2"):
        assert main(["adapt", "--backend", backend, "--target", "Wall painting", "--output_dir", str(tmp_path / backend)]) == 2
        err = capsys.readouterr().err
        assert "known domains: photo, sketch" in err
        # what works for other labels, as ipl adapt and the Python API spell it
        assert "ipl adapt --clip_model openai/clip-vit-base-patch32" in err
        assert "ipl adapt --model <pipeline folder or Hub id whose text_encoder is a real CLIP>" in err
        assert 'StyleGANIPLPipeline.from_components(<generator>, text_encoder="openai/clip-vit-base-patch32")' in err
        assert not (tmp_path / backend).exists()


def test_unusable_device_is_one_line_before_any_model_loads(capsys):
    assert main(["sample", "--output", "unused", "--device", "banana"]) == 2
    assert "is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["translate", "--model", "m", "--input", "i", "--output", "o", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_adapt_refuses_bad_output_and_image_count_before_loading(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main(["adapt", "--target", "sketch", "--output_dir", str(afile)]) == 2
    assert "existing file" in capsys.readouterr().err
    assert afile.read_text() == "keep me"
    assert main(["adapt", "--target", "sketch", "--num_images", "1", "--output_dir", str(tmp_path / "o")]) == 2
    assert "num_images must be a whole number >= 2; got 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_adapt_refuses_to_write_into_the_images_folder(photos, capsys):
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    assert main(["adapt", "--target", "sketch", "--images", str(photos), "--output_dir", str(photos)]) == 2
    assert "is the --images folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--iterations", "0", "iterations must be a whole number >= 1; got 0"),
        ("--stage1-iterations", "-1", "stage1_iterations must be a whole number >= 0; got -1"),
        ("--checkpointing-steps", "0", "checkpointing_steps must be a whole number >= 1 or None; got 0"),
        ("--learning_rate", "nan", "learning_rate must be a finite number > 0; got nan"),
        ("--learning_rate", "0", "learning_rate must be a finite number > 0; got 0.0"),
        ("--l1_loss_weight", "-0.5", "l1_loss_weight must be a finite number >= 0; got -0.5"),
        ("--batch-size", "two", "argument --batch_size/--batch-size: invalid int value: 'two'"),
    ],
)
def test_adapt_option_values_are_refused_before_any_work(option, value, message, tmp_path, capsys):
    # Values are checked by the configs (ipl_diffusion.configs) before a model is loaded; types by the parser.
    try:
        code = main(["adapt", "--target", "sketch", option, value, "--output_dir", str(tmp_path / "o")])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_misspelt_resume_fails_before_stage1_writes(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out), *FAST_CLI_ARGS]
    assert main([*args, "--resume-from-checkpoint", "checkpoint-99"]) == 2
    assert "checkpoint 'checkpoint-99' not found" in capsys.readouterr().err
    assert not (out / "stage1").exists() and not (out / "cache.safetensors").exists()


def test_a_folder_of_the_other_backend_names_the_right_one(model_dir, tmp_path, capsys):
    from ipl_diffusion.shapes import default_model_path

    # (without --backend the folder's family is used: tests/test_stylegan2_pipeline.py)
    assert main(["sample", "--backend", "diffae", "--model", str(default_model_path("stylegan2")), "--output", str(tmp_path / "s")]) == 2
    assert "is a StyleGANIPLPipeline folder; use --backend stylegan2" in capsys.readouterr().err
    assert main(["sample", "--backend", "stylegan2", "--model", str(model_dir), "--output", str(tmp_path / "s")]) == 2
    assert "is an IPLPipeline folder; use --backend diffae" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_max_grad_norm_none_turns_clipping_off_through_the_cli(tmp_path, monkeypatch, capsys):
    """`--max_grad_norm none` reaches pipe.adapt as None (TrainingConfig: None = no clipping);
    options not given are not passed at all, so a model's adapt_defaults still apply."""
    import ipl_diffusion.cli.adapt as adapt

    calls = []

    class Recorder:
        config = {}

        def adapt(self, target, source, **kwargs):
            calls.append(kwargs)
            raise adapt.UserError("stopped after pipe.adapt was called")

    monkeypatch.setattr(adapt, "load_pipeline", lambda *a, **k: Recorder())
    args = ["adapt", "--model", str(tmp_path / "any-model"), "--target", "sketch", "--output_dir", str(tmp_path / "o")]
    assert main([*args, "--max_grad_norm", "none"]) == 2
    assert main(args) == 2
    assert "stopped after pipe.adapt" in capsys.readouterr().err
    assert "max_grad_norm" in calls[0] and calls[0]["max_grad_norm"] is None
    assert "max_grad_norm" not in calls[1]


def test_an_empty_target_images_folder_is_refused_naming_the_option(tmp_path, capsys):
    empty = tmp_path / "style"
    empty.mkdir()
    assert main(["adapt", "--target_images", str(empty), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"no image files found in '{empty}' (given as --target_images)" in err, err


@pytest.mark.parametrize("option, damage", [("--images", "not an image"), ("--target_images", "truncated JPEG")])
def test_a_bad_image_is_refused_naming_it_before_the_model_loads(option, damage, photos, tmp_path, monkeypatch, capsys):
    import ipl_diffusion.cli.adapt as adapt

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the images were checked")

    monkeypatch.setattr(adapt, "load_pipeline", no_model)
    if damage == "truncated JPEG":  # PIL's verify alone does not read JPEG data
        (photos / "broken.png").unlink()
        data = (photos / "wide.jpg").read_bytes()
        (photos / "wide.jpg").write_bytes(data[: len(data) // 2])
    argv = ["adapt", "--model", str(tmp_path / "model"), "--target", "sketch", option, str(photos),
            "--output_dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    bad = photos / ("broken.png" if damage == "not an image" else "wide.jpg")
    assert err.startswith(f"ipl adapt: error: {option}: cannot read image '{bad}'") and err.count("\n") == 1, err


def test_adapt_help_names_the_rows_the_before_after_grids_draw(monkeypatch, capsys):
    """The row labels the DiffAE trainer and the StyleGAN2 pipeline draw into before_after.png
    (caught at labelled_grid) are the rows `ipl adapt --help` lists, the target as TARGET."""
    from types import SimpleNamespace

    import ipl_diffusion.grids
    from ipl_diffusion import ddim
    from ipl_diffusion.adaptation.diffae_trainer import DiffAEStage2Trainer
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    drawn = []
    monkeypatch.setattr(ipl_diffusion.grids, "labelled_grid", lambda rows, labels, *args, **kwargs: drawn.append(labels))
    monkeypatch.setattr(ddim, "decode_from_t0", lambda unet, x_t0, *args: x_t0)
    images = {name: torch.zeros(2, 3, 4, 4) for name in ("x0", "x_t0", "z_sem")}
    trainer = SimpleNamespace(unet=None, cache={}, device="cpu", source_unet=None, scheduler=None, t0=1,
                              config=SimpleNamespace(num_sample_images=2, num_inference_steps=1),
                              run_config={"target": "sketch"})
    DiffAEStage2Trainer.sample_grid(trainer, items=images)  # held-out images, as ipl adapt shows them

    class Generator:  # StyleGANIPLPipeline.make_sample_grid's use of the pipeline
        source_generator = SimpleNamespace(style_dim=4)
        config = SimpleNamespace(target_label="sketch")

        def __call__(self, latents, **kwargs):
            return SimpleNamespace(images=torch.zeros(latents.shape[0], 3, 4, 4))

    StyleGANIPLPipeline.make_sample_grid(Generator(), num_images=2)
    text = adapt_help(capsys)
    for labels in drawn:
        assert " | ".join(labels).replace("sketch", "TARGET") in text, (labels, text)
    assert len(drawn) == 2 and len(drawn[0]) == 3 and len(drawn[1]) == 2
