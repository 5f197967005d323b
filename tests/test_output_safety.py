"""Nothing lost: occupied / locked / read-only output folders, atomic writes."""

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from ipl_diffusion.cli import main
from ipl_diffusion.errors import UserError
from ipl_diffusion.outputs import LOCK_NAME, atomic_folder, atomic_save_image, check_writable, output_lock
from tiny_ipl import FAST_CLI_ARGS, build_tiny_ipl_pipeline

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def earlier_result(folder):
    """What a finished `ipl adapt` leaves behind (stand-in files: the refusal never reads them)."""
    (folder / "pipeline").mkdir(parents=True)
    (folder / "pipeline" / "model_index.json").write_text('{"_class_name": "IPLPipeline"}')
    (folder / "before_after.png").write_bytes(b"first grid")
    (folder / "run_config.json").write_text('{"target": "sketch"}')
    return snapshot(folder)


def earlier_checkpoint(folder):
    """An earlier run's complete checkpoint, as list_checkpoints counts one (stand-in files)."""
    from ipl_diffusion.checkpointing import META_FILE, STATE_FILE

    (folder / "checkpoints" / "checkpoint-7").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint-7" / STATE_FILE).write_bytes(b"weights")
    (folder / "checkpoints" / "checkpoint-7" / META_FILE).write_text("{}")


def one_line_error(capsys, command="adapt"):
    """The error line; stderr must hold nothing else (no progress bar: refused before any work)."""
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ipl {command}: error:") and "\n" not in err, err
    return err


# ------------------------------------------------------------------ occupied --output


def test_adapt_refuses_an_output_that_holds_an_earlier_result(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    before = earlier_result(out)
    assert main(["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out), *FAST_CLI_ARGS]) == 2
    err = one_line_error(capsys)
    assert "already holds the result of an earlier run (pipeline, before_after.png)" in err and "--overwrite" in err
    assert snapshot(out) == before  # byte-identical, nothing added (no lock file left either)
    # "--resume-from-checkpoint latest" with no checkpoint is a fresh run: refused the same way
    args = ["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out),
            "--resume-from-checkpoint", "latest", *FAST_CLI_ARGS]
    assert main(args) == 2 and "earlier run" in one_line_error(capsys)
    assert snapshot(out) == before


def test_adapt_refuses_a_folder_of_the_users_files(model_dir, tmp_path, capsys):
    """A user's own losses.csv would be replaced by the run's log: a fresh run needs an empty
    or new folder (or --overwrite), as transformers' scripts need --overwrite_output_dir."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "losses.csv").write_text("my own numbers\n")
    (out / "todo.txt").write_text("keep me\n")
    before = snapshot(out)
    assert main(["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out), *FAST_CLI_ARGS]) == 2
    err = one_line_error(capsys)
    assert "is not empty (losses.csv, todo.txt)" in err and "--overwrite" in err
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["losses.csv", "todo.txt"]
    # Asking to resume where there is nothing to resume is a fresh run: refused the same way,
    # and so is resuming another folder's checkpoint into this one.
    earlier_checkpoint(tmp_path / "elsewhere")
    for resume in ("latest", str(tmp_path / "elsewhere" / "checkpoints" / "checkpoint-7")):
        assert main(["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out),
                     "--resume_from_checkpoint", resume, *FAST_CLI_ARGS]) == 2
        assert "is not empty (losses.csv, todo.txt)" in one_line_error(capsys)
        assert snapshot(out) == before


def test_overwrite_keeps_the_earlier_run_until_this_one_can_start(model_dir, tmp_path, capsys):
    """--overwrite replaces the earlier checkpoints only once the model has loaded: a run
    refused on a bad --clip_model leaves the folder as it was (it used to delete checkpoints/)."""
    out = tmp_path / "run"
    earlier_result(out)
    earlier_checkpoint(out)
    (out / "checkpoints" / "notes.txt").write_text("not a checkpoint\n")
    before = snapshot(out)
    assert main(["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out), "--overwrite",
                 "--clip_model", str(tmp_path / "no-such-clip"), *FAST_CLI_ARGS]) == 2
    assert "no-such-clip" in one_line_error(capsys)
    assert snapshot(out) == before


def test_overwrite_keeps_the_earlier_checkpoints_when_the_label_is_refused_after_loading(model_dir, tmp_path, capsys):
    """Only the loaded CLIP can tell a label too long for it, and adapt checks it after the
    model has loaded: the earlier run's checkpoints must survive that refusal too."""
    out = tmp_path / "run"
    earlier_result(out)
    earlier_checkpoint(out)
    before = snapshot(out)
    too_long = " ".join(["watercolour"] * 100)
    assert main(["adapt", "--model", str(model_dir), "--target", too_long, "--output_dir", str(out), "--overwrite",
                 *FAST_CLI_ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model-loading bars
    assert err.startswith("ipl adapt: error: The domain label 'watercolour watercolour") and "too long" in err
    assert len(err) < 400  # the label is not echoed whole
    assert snapshot(out) == before


@pytest.mark.slow
def test_adapt_overwrite_replaces_the_earlier_result(model_dir, tmp_path):
    out = tmp_path / "run"
    earlier_result(out)
    (out / "todo.txt").write_text("keep me\n")  # a user's file beside the result: written around, kept
    earlier_checkpoint(out)
    (out / "checkpoints" / "notes.txt").write_text("not a checkpoint\n")
    (out / "step_choice.json").write_text('{"chosen_step": 200}')  # the earlier run chose a step
    (out / "candidates" / "step-000200").mkdir(parents=True)
    assert main(["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out), "--overwrite",
                 *FAST_CLI_ARGS]) == 0
    assert (out / "pipeline" / "unet").is_dir() and (out / "before_after.png").read_bytes() != b"first grid"
    assert not (out / "step_choice.json").exists() and not (out / "candidates").exists()  # not this result's
    assert not (out / "checkpoints" / "checkpoint-7").exists() and (out / "todo.txt").read_text() == "keep me\n"
    assert (out / "checkpoints" / "notes.txt").read_text() == "not a checkpoint\n"
    assert not (out / LOCK_NAME).exists() and not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------------------- the lock

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from ipl_diffusion.outputs import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
    """
)


def hold_lock(folder):
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_into_a_locked_folder_is_refused_at_once(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        before = snapshot(out)
        assert main(["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out), *FAST_CLI_ARGS]) == 2
        err = one_line_error(capsys)
        assert f"is in use by another run (pid {holder.pid} on" in err
        assert snapshot(out) == before  # the first run's folder is untouched (its lock too)
        with pytest.raises(UserError, match="in use by another run"):  # the API refuses as well
            build_tiny_ipl_pipeline().adapt("sketch", num_images=2, output_dir=str(out))
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not (out / LOCK_NAME).exists()  # released and removed on exit


def test_a_stale_lock_of_a_killed_run_is_reported_and_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f"pid {holder.pid}" in (out / LOCK_NAME).read_text()  # left behind by kill -9
    with pytest.warns(UserWarning, match=rf"\(pid {holder.pid} on .*\) is no longer running"):
        with output_lock(out):
            assert f"pid {os.getpid()}" in (out / LOCK_NAME).read_text()
            with output_lock(out):  # re-entrant within one process (CLI around the API)
                pass
            assert (out / LOCK_NAME).exists()
    assert not (out / LOCK_NAME).exists()


# ------------------------------------------------------------------ read-only outputs


def test_read_only_output_is_refused_before_any_work(model_dir, read_only_dir, tmp_path, capsys, monkeypatch):
    import ipl_diffusion.cli.adapt as adapt_cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(adapt_cli, "load_pipeline", no_model)
    for out in (read_only_dir, read_only_dir / "new-run"):
        assert main(["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out), *FAST_CLI_ARGS]) == 2
        assert "is not writable" in one_line_error(capsys)
    with pytest.raises(UserError, match="output_dir .* is not writable"):
        build_tiny_ipl_pipeline().adapt("sketch", num_images=2, output_dir=str(read_only_dir / "run"))
    check_writable(tmp_path / "a" / "b")  # a folder that can still be created is fine


# ---------------------------------------------------------------------- atomic writes


def test_a_crash_while_saving_leaves_the_earlier_result(tmp_path):
    from ipl_diffusion.cli.adapt import _save_outputs

    out = tmp_path / "run"
    before = earlier_result(out)

    class Crashes:
        sample_grid = None
        adaptation_config = {"target": "new"}

        def save_pretrained(self, folder):
            (Path(folder) / "model_index.json").write_text("half of the new pipeline")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _save_outputs(Crashes(), out, {})
    assert snapshot(out) == before and [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_atomic_folder_and_image_replace_whole(tmp_path):
    from PIL import Image

    target = tmp_path / "pipeline"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_folder(target) as folder:
        (folder / "new.txt").write_text("new")
        assert (target / "old.txt").is_file()  # the old one stays until the new one is complete
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    atomic_save_image(Image.new("RGB", (4, 4)), tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (4, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "pipeline"]


def test_no_warning_for_a_clean_lock(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with output_lock(tmp_path / "x"):
            pass
        with output_lock(tmp_path / "x"):
            pass


# ------------------------------------------------------------------ checkpoint digests


@pytest.mark.slow
def test_resume_from_a_bit_flipped_checkpoint_is_one_line_error(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out), *FAST_CLI_ARGS,
            "--checkpointing-steps", "1"]
    assert main(args) == 0
    state = out / "checkpoints" / "checkpoint-1" / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-3] ^= 0x10  # one bit of one weight: still a valid safetensors file
    state.write_bytes(bytes(data))
    before = snapshot(out)
    capsys.readouterr()
    assert main([*args, "--iterations", "2", "--resume-from-checkpoint", "latest"]) == 2
    err = one_line_error(capsys)
    assert f"checkpoint file {state} does not match the sha256 digest" in err
    assert snapshot(out) == before
    # The Stage-1 cache (encoded sources, text features) that a resume reuses is checked the same way.
    data[-3] ^= 0x10
    state.write_bytes(bytes(data))
    cache = out / "cache.safetensors"
    data = bytearray(cache.read_bytes())
    data[-3] ^= 0x10
    cache.write_bytes(bytes(data))
    capsys.readouterr()
    assert main([*args, "--iterations", "2", "--resume-from-checkpoint", "latest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars of sampling
    assert err == f"ipl adapt: error: {cache} does not match the sha256 digest recorded when it was written " \
                  "(changed or damaged on disk); delete it to have it computed again"


# ------------------------------------------------------------------- fp16 weights on CPU


def test_half_precision_weights_on_cpu_are_refused_by_both_backends(model_dir, tiny_clip):
    import torch
    from transformers import CLIPImageProcessor

    from ipl_diffusion.models.stylegan2 import StyleGAN2Generator
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    pipe = IPLPipeline.from_pretrained(str(model_dir), torch_dtype=torch.float16)
    with pytest.raises(UserError, match=r"adapt on a CPU needs float32 weights, but the semantic_encoder's are torch.float16"):
        pipe.adapt("sketch", num_images=2, stage1_iterations=1, iterations=1, progress=False)
    clip, tokenizer = tiny_clip
    generator = StyleGAN2Generator(size=32, style_dim=16, n_mlp=2, channel_max=8).to(torch.float16)
    gan = StyleGANIPLPipeline.from_components(generator, clip, tokenizer, CLIPImageProcessor(), source_label="photo")
    with pytest.raises(UserError, match=r"the generator's are torch.float16.*mixed_precision='fp16' on a CUDA GPU"):
        gan.adapt("sketch", stage1_num_images=2, stage1_iterations=1, iterations=1, progress=False)


# -------------------------------------------------- the same kinds in the other commands


def test_sample_refuses_to_replace_earlier_samples_unless_overwrite(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "samples"
    out.mkdir()
    (out / "sample_0001.png").write_bytes(b"an earlier sample")
    before = snapshot(out)
    args = ["sample", "--model", str(model_dir), "--output", str(out), "--num-images", "2", "--steps", "2", "--device", "cpu"]
    assert main(args) == 2
    err = one_line_error(capsys, "sample")
    assert "already holds the result of an earlier run (sample_0001.png)" in err and "--overwrite" in err
    assert snapshot(out) == before
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_0000.png", "sample_0001.png", "samples_grid.png"]
    assert (out / "sample_0001.png").read_bytes() != b"an earlier sample"


def test_a_broken_symlink_as_output_is_refused_in_one_line(model_dir, tmp_path, capsys):
    link = tmp_path / "run"
    link.symlink_to(tmp_path / "gone")  # was a FileExistsError traceback from the lock's mkdir
    for out in (link, link / "sketch"):  # the folder itself, or one above it
        assert main(["adapt", "--model", str(model_dir), "--target", "sketch", "--output_dir", str(out), *FAST_CLI_ARGS]) == 2
        assert "is a symbolic link to" in one_line_error(capsys) and link.is_symlink() and not (tmp_path / "gone").exists()


def test_example_scripts_report_ctrl_c_in_one_line(tmp_path):
    """run_script, as `ipl`: one line and the shell's status for SIGINT, not a traceback."""
    script = tmp_path / "loop.py"
    script.write_text("from ipl_diffusion.cli import run_script\n"
                      "def main():\n    raise KeyboardInterrupt\n"
                      "run_script(main)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 130 and result.stderr.strip() == "loop.py: interrupted", result.stderr


def test_translate_and_sample_refuse_a_read_only_output_before_loading(read_only_dir, tmp_path, capsys, monkeypatch):
    import ipl_diffusion.cli.adapt as adapt_cli

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(adapt_cli, "load_pipeline", no_model)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"not read before the check")
    out = str(read_only_dir / "out")
    assert main(["translate", "--model", "m", "--input", str(photos), "--output", out]) == 2
    assert "is not writable" in one_line_error(capsys, "translate")
    assert main(["sample", "--model", "m", "--output", out]) == 2
    assert "is not writable" in one_line_error(capsys, "sample")


def test_convert_refuses_a_read_only_output_before_reading_the_checkpoint(read_only_dir, tmp_path, capsys):
    missing = tmp_path / "never-read.ckpt"  # the output is checked first, so its absence is not reported
    for family in ("diffae", "stylegan2"):
        assert main(["convert", family, "--checkpoint", str(missing), "--output", str(read_only_dir / "out")]) == 2
        assert "output folder" in (err := one_line_error(capsys, "convert")) and "is not writable" in err, err


@pytest.mark.parametrize("script", ["train_clip", "train_oracle", "train_diffae", "train_stylegan2"])
def test_shapes_training_scripts_refuse_a_work_dir_in_use(script, tmp_path):
    from repo_scripts import load_script

    work = tmp_path / "work"
    holder = hold_lock(work)
    try:
        with pytest.raises(UserError, match=rf"--work_dir {work} is in use by another run \(pid {holder.pid}"):
            load_script(f"examples/shapes/{script}.py").main(
                ["--work_dir", str(work), "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "--max_minutes", "0.01"]
            )
    finally:
        holder.communicate("")


@pytest.mark.parametrize("script", ["train_clip", "train_oracle", "train_diffae", "train_stylegan2"])
@pytest.mark.parametrize("option", ["--init_from", "--resume_from_checkpoint"])
def test_shapes_training_scripts_refuse_a_missing_folder_in_one_line(script, option, tmp_path):
    """Run as a user runs them: one line, argparse's exit status 2 (as `ipl`), nothing created.
    train_oracle / train_diffae gave a Hub-download traceback for a missing --init_from, and
    train_diffae left its --output_dir behind."""
    work, out = tmp_path / "work", tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "shapes" / f"{script}.py"), option, str(tmp_path / "missing"),
         "--work_dir", str(work), "--output_dir", str(out), "--max_steps", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith(f"{script}.py: error: "), result.stderr
    named = {"--init_from": "--init_from", "--resume_from_checkpoint": "checkpoint"}[option]
    assert named in lines[-1].split("error:", 1)[1], lines[-1]
    assert "Traceback" not in result.stderr and sorted(p.name for p in tmp_path.iterdir()) == []


def test_atomic_outputs_get_the_mode_a_plain_write_would(tmp_path):
    """mkstemp / mkdtemp make private temporaries; renamed into place they must not leave the
    results unreadable to others (a fresh user found -rw------- outputs under umask 022)."""
    import os
    import stat

    from PIL import Image

    import torch

    from ipl_diffusion.adaptation.diffae import _save_cache
    from ipl_diffusion.outputs import atomic_folder, atomic_save_image, atomic_write_text

    old = os.umask(0o022)
    try:
        text = atomic_write_text(tmp_path / "run_config.json", "{}")
        image = atomic_save_image(Image.new("RGB", (2, 2)), tmp_path / "grid.png")
        with atomic_folder(tmp_path / "pipeline"):
            pass
        _save_cache(tmp_path / "cache.safetensors", {"z_sem": torch.zeros(2, 3)}, {"t0": 200})  # was -rw-------
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cache.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(text.stat().st_mode) == 0o644
    assert stat.S_IMODE(image.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "pipeline").stat().st_mode) == 0o755


@pytest.mark.parametrize("script", ["train_clip", "train_oracle", "train_diffae", "train_stylegan2"])
@pytest.mark.parametrize("option, value, said", [
    ("--batch_size", "0", "--batch_size: must be >= 1; got 0"),  # was a traceback deep in training
    ("--max_steps", "-5", "--max_steps: must be >= 0; got -5"),  # 0 stays: a warm start, copied
    ("--init_from", " ", "--init_from: is empty"),  # was read as "not given": a fresh network
    ("--learning_rate", "0", "--learning_rate: must be a finite number > 0; got 0.0"),
])
def test_shapes_training_scripts_refuse_bad_sizes_and_an_empty_init_from(script, option, value, said, tmp_path, capsys):
    from repo_scripts import load_script

    parse_args = load_script(f"examples/shapes/{script}.py").parse_args
    with pytest.raises(SystemExit) as exit_:
        parse_args([option, value, "--work_dir", str(tmp_path / "w"), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and said in err
    assert err.count("\n") == 1, err  # one line: no usage block before it
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0,2", "a,b", "", "-1,2"])  # tracebacks deep in the model build
def test_train_diffae_refuses_a_bad_channel_mult_at_parse_time(value, tmp_path, capsys):
    from repo_scripts import load_script

    with pytest.raises(SystemExit):
        load_script("examples/shapes/train_diffae.py").parse_args([f"--channel_mult={value}", "--output_dir", str(tmp_path / "o")])
    assert "--channel_mult: expected whole numbers >= 1 separated by commas" in capsys.readouterr().err
