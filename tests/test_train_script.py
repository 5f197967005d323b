"""examples/train_ipl_diffae.py: outputs, resume after interruption, two processes (gloo)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from repo_scripts import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_ipl_diffae.py"
TINY_ARGS = [
    "--target", "sketch", "--num_images", "4", "--stage1_iterations", "2", "--stage1_batch_size", "4",
    "--t0", "200", "--num_inversion_steps", "3", "--num_train_steps", "2", "--num_inference_steps", "3",
    "--learning_rate", "1e-3", "--seed", "5",
]


def unet_weights(output_dir):
    return load_file(str(Path(output_dir) / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))


def run_script(args, launcher=(sys.executable,), timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_script_outputs(model_dir, tmp_path):
    script = load_script("examples/train_ipl_diffae.py")
    out = tmp_path / "run"
    script.main(["--model", str(model_dir), "--output_dir", str(out), *TINY_ARGS,
                 "--iterations", "2", "--batch_size", "2", "--checkpointing_steps", "1",
                 "--sample_steps", "1", "--enable_xformers_memory_efficient_attention"])
    assert (out / "pipeline" / "model_index.json").is_file() and (out / "pipeline" / "sample_grid.png").is_file()
    config = json.loads((out / "run_config.json").read_text())
    assert config["stage2"]["iterations"] == 2 and config["stage2"]["t0"] == 200
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000001.png", "step_000002.png"]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["checkpoint-1", "checkpoint-2"]
    assert (out / "losses.csv").is_file() or (out / "logs").is_dir()


@pytest.mark.slow
def test_interrupted_run_resumes_to_identical_weights(model_dir, tmp_path):
    common = ["--model", str(model_dir), *TINY_ARGS, "--batch_size", "2",
              "--checkpointing_steps", "2"]
    run_script([*common, "--output_dir", str(tmp_path / "full"), "--iterations", "4"])
    # The first run stops after its checkpoint at step 2 (as if killed there) ...
    run_script([*common, "--output_dir", str(tmp_path / "resumed"), "--iterations", "2"])
    shutil.rmtree(tmp_path / "resumed" / "pipeline")
    # ... and the rerun picks it up.
    result = run_script([*common, "--output_dir", str(tmp_path / "resumed"), "--iterations", "4",
                         "--resume_from_checkpoint", "latest"])
    full, resumed = unet_weights(tmp_path / "full"), unet_weights(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert "Stage 2" in result.stderr  # progress bars go to stderr


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(model_dir, tmp_path):
    # The L1 term (weight 1) is far from rounding noise at step 1: |reconstruction - source|.
    # It is the only term (CLIP weight 0): at step 1 the adapted and source images are equal up
    # to rounding, so the CLIP direction's gradient is rounding noise that differs between the
    # runs, while the L1 gradient is the same function of the same batch in both.
    common = ["--model", str(model_dir), *TINY_ARGS, "--iterations", "1",
              "--l1_loss_weight", "1", "--clip_loss_weight", "0"]
    run_script([*common, "--output_dir", str(tmp_path / "one"), "--batch_size", "2"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    result = run_script([*common, "--output_dir", str(tmp_path / "two"), "--batch_size", "1"], launcher=torchrun)
    assert "MULTI_CPU" in result.stderr + result.stdout and "gloo" in result.stderr + result.stdout
    assert json.loads((tmp_path / "two" / "run_config.json").read_text())["num_processes"] == 2
    # Sharding: the two halves of the global batch give the same (logged, all-reduced) loss. The
    # L1 term is compared: it is the mean over the two halves, equal to the one-process value to
    # the CSV's 6 digits, where a sum over the processes would double it.
    assert losses(tmp_path / "two", "l1") == pytest.approx(losses(tmp_path / "one", "l1"), rel=1e-5)
    assert losses(tmp_path / "one", "l1")[0] > 0.01  # far above rounding noise
    # Gradient averaging, measured on the gradient itself: the trainer logs the UNet's gradient
    # norm after the all-reduce and before clipping. Each process's gradient is that of the mean
    # L1 over its half, so their mean is the one-process gradient on the whole batch; a summing
    # all-reduce would log twice the norm. (The weights below cannot show this: Adam's first
    # step is +-lr per element whatever the gradient's scale.)
    assert losses(tmp_path / "one", "grad_norm")[0] > 1e-3  # a gradient to compare, not zero
    assert losses(tmp_path / "two", "grad_norm") == pytest.approx(losses(tmp_path / "one", "grad_norm"), rel=1e-4)
    # Gradient averaging: the same update up to float noise. (Adam turns gradients that are
    # ~0 up to rounding into +-lr steps of random sign, so compare the bulk, not every element.)
    one, two = unet_weights(tmp_path / "one"), unet_weights(tmp_path / "two")
    differ = sum(int(((one[k] - two[k]).abs() > 1e-5).sum()) for k in one)
    assert differ / sum(v.numel() for v in one.values()) < 0.05
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 2.5e-3  # at most ~ two Adam steps of lr 1e-3


def losses(output_dir, name="loss"):
    import csv

    with open(Path(output_dir) / "losses.csv") as handle:  # always written (one column per value)
        return [float(row[name]) for row in csv.DictReader(handle)]


# Each process takes every second row of one batch, computes its share's loss and gradient, and
# averages both with the trainers' all-reduces; rank 0 writes what it got.
REDUCE_SCRIPT = """
import json, sys, torch
from ipl_diffusion.adaptation.distributed import average_gradients, make_accelerator, mean_over_processes
acc = make_accelerator("no", "cpu")
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
x, y = torch.randn(6, 4), torch.randn(6, 3)
mine = slice(acc.process_index, None, acc.num_processes)
loss = torch.nn.functional.mse_loss(model(x[mine]), y[mine])
loss.backward()
average_gradients(list(model.parameters()), acc)
logged = mean_over_processes({"loss": loss.item()}, acc)
if acc.is_main_process:
    grads = {name: p.grad.tolist() for name, p in model.named_parameters()}
    json.dump({"world": acc.num_processes, "loss": logged["loss"], "grads": grads}, open(sys.argv[1], "w"))
acc.wait_for_everyone()  # exit together: a process leaving gloo early aborts the other
acc.end_training()
"""


@pytest.mark.slow
def test_two_process_all_reduces_average_gradients_and_losses(tmp_path):
    """Adam's first steps do not depend on the gradients' scale, so comparing weights cannot
    tell an averaging all-reduce from a summing one; this compares the gradients and the logged
    loss themselves to one process's on the whole batch (a sum would double both)."""
    import json

    script, out = tmp_path / "reduce.py", tmp_path / "reduced.json"
    script.write_text(REDUCE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    result = subprocess.run([*torchrun, str(script), str(out)], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reduced = json.loads(out.read_text())
    assert reduced["world"] == 2
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randn(6, 3)
    loss = torch.nn.functional.mse_loss(model(x), y)  # equal shares: the mean of the shares' means
    loss.backward()
    assert reduced["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(torch.tensor(reduced["grads"][name]), p.grad, rtol=1e-5, atol=1e-7), name


def test_script_refuses_an_output_dir_with_an_earlier_pipeline(model_dir, tmp_path):
    from ipl_diffusion.errors import UserError

    script = load_script("examples/train_ipl_diffae.py")
    out = tmp_path / "run"
    (out / "pipeline").mkdir(parents=True)
    (out / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match=r"--output_dir .* already holds the result of an earlier run \(pipeline\).*--overwrite"):
        script.main(["--model", str(model_dir), "--output_dir", str(out), *TINY_ARGS,
                     "--iterations", "1"])
    assert (out / "pipeline" / "model_index.json").read_text() == "{}"
    (out / "pipeline" / "model_index.json").unlink()
    (out / "pipeline").rmdir()
    (out / "losses.csv").write_text("a user's own numbers\n")  # the run's log would replace it
    for resume in ([], ["--resume_from_checkpoint", "latest"]):  # nothing to resume: a fresh run
        with pytest.raises(UserError, match=r"--output_dir .* is not empty \(losses.csv\).*--overwrite"):
            script.main(["--model", str(model_dir), "--output_dir", str(out), *TINY_ARGS, "--iterations", "1", *resume])
    assert sorted(p.name for p in out.iterdir()) == ["losses.csv"]
    assert (out / "losses.csv").read_text() == "a user's own numbers\n"


def test_clip_model_supplies_the_clip_a_folder_does_not_store(model_dir, tmp_path):
    """``--clip_model`` (the option ``ipl adapt`` has too): a pipeline folder saved without its
    CLIP components trains as the complete folder does when they come from a CLIP folder."""
    from ipl_diffusion.errors import UserFileNotFoundError
    from ipl_diffusion.shapes import CLIP_COMPONENTS

    script = load_script("examples/train_ipl_diffae.py")
    clip, bare = tmp_path / "clip", tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    clip.mkdir()
    for name in CLIP_COMPONENTS:  # one CLIP folder, as CLIPModel / tokenizer / processor save_pretrained write it
        for item in (bare / name).iterdir():
            shutil.copy(item, clip / item.name)
        shutil.rmtree(bare / name)
    args = [*TINY_ARGS, "--iterations", "1", "--batch_size", "2"]
    with pytest.raises(UserFileNotFoundError, match="`--clip_model CLIP` to ipl adapt / examples/train_ipl_diffae.py"):
        script.main(["--model", str(bare), "--output_dir", str(tmp_path / "refused"), *args])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    refused = subprocess.run([sys.executable, str(SCRIPT), "--model", str(bare), "--output_dir", str(tmp_path / "refused"), *args],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    # on the command line: one line and argparse's exit status, not a traceback
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("train_ipl_diffae.py: error: ")
    assert "Traceback" not in refused.stderr
    script.main(["--model", str(bare), "--clip_model", str(clip), "--output_dir", str(tmp_path / "bare_run"), *args])
    script.main(["--model", str(model_dir), "--output_dir", str(tmp_path / "full_run"), *args])
    bare_weights, full_weights = unet_weights(tmp_path / "bare_run"), unet_weights(tmp_path / "full_run")
    assert bare_weights.keys() == full_weights.keys()
    assert all(torch.equal(bare_weights[k], full_weights[k]) for k in full_weights)
    assert (tmp_path / "bare_run" / "pipeline" / "text_encoder").is_dir()  # the adapted folder is complete
