"""examples/shapes/train_stylegan2.py on a tiny config: the reconstruction loss by hand, each
phase training only what it should, warm starts, and clear refusals."""

import json

import pytest
import torch
import torch.nn.functional as F

from ipl_diffusion.checkpointing import load_checkpoint, resolve_checkpoint
from ipl_diffusion.models import StyleGAN2Generator
from repo_scripts import load_script

TINY = [
    "--resolution", "16", "--style_dim", "16", "--n_mlp", "2", "--channel_max", "8", "--encoder_channels", "8",
    "--batch_size", "4", "--checkpointing_steps", "100", "--oracle", "no-oracle",
    "--mapping_codes", "300", "--mapping_kimg", "2",
]

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny latency-bound models (conftest.py)


@pytest.fixture(scope="module")
def script():
    return load_script("examples/shapes/train_stylegan2.py")


@pytest.fixture(scope="module")
def run(script, tmp_path_factory):
    """A GAN run, then autoencoder and mapping phases warm-started from its g_ema."""
    root = tmp_path_factory.mktemp("shapes_stylegan2")
    script.main(TINY + ["--max_steps", "2", "--work_dir", str(root / "gan"), "--output_dir", str(root / "gan_out")])
    common = TINY + ["--work_dir", str(root / "ae"), "--output_dir", str(root / "ae_out")]
    script.main(common + ["--phase", "autoencoder", "--max_steps", "3", "--init_from", str(root / "gan_out")])
    script.main(common + ["--phase", "mapping"])
    return root


def test_reconstruction_loss_is_mse_plus_gradient_difference(script):
    recon = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    real = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]]])
    mse = (1 + 0 + 1 + 9) / 4
    # Horizontal differences: recon (1, 2) vs real (0, 0); vertical: recon (2, 3) vs real (0, 0).
    edges = (1 + 2) / 2 + (2 + 3) / 2
    assert script.reconstruction_loss(recon, real, 0.5).item() == pytest.approx(mse + 0.5 * edges)
    assert script.reconstruction_loss(recon, real, 0.0).item() == pytest.approx(mse)


def _weights(root, phase, name):
    model = StyleGAN2Generator(size=16, style_dim=16, n_mlp=2, channel_multiplier=1, channel_max=8)
    load_checkpoint(resolve_checkpoint(root / phase, "latest"), {name: model}, restore_rng=False)
    return model.state_dict()


def test_autoencoder_phase_trains_synthesis_not_mapping(run):
    start = StyleGAN2Generator.from_pretrained(run / "gan_out").state_dict()
    after = _weights(run / "ae", "autoencoder", "generator")
    mapping = [k for k in start if k.startswith("style.")]
    synthesis = [k for k in start if not k.startswith("style.") and not k.startswith("noises.")]
    assert mapping and all(torch.equal(start[k], after[k]) for k in mapping)
    assert any(not torch.equal(start[k], after[k]) for k in synthesis)
    record = json.loads((run / "ae" / "autoencoder" / "training_record.json").read_text())
    assert record["steps"] == 3 and record["init_from"] == str(run / "gan_out")
    assert record["warm_start"]["steps"] == 2  # the GAN run it started from


def test_mapping_phase_trains_mapping_only_and_writes_a_loadable_generator(run):
    autoencoder = _weights(run / "ae", "autoencoder", "generator")
    final = StyleGAN2Generator.from_pretrained(run / "ae_out").state_dict()
    assert all(torch.equal(autoencoder[k], final[k]) for k in final if not k.startswith("style."))
    assert any(not torch.equal(autoencoder[k], final[k]) for k in final if k.startswith("style."))
    record = json.loads((run / "ae_out" / "training_record.json").read_text())
    assert record["phase"] == "mapping" and record["autoencoder"]["steps"] == 3
    assert (run / "ae_out" / "samples.png").is_file()


def test_a_killed_autoencoder_phase_resumes_where_it_stopped(script, tmp_path, capsys):
    """2 steps, then a re-run to 4, give the weights of 4 steps in one go (data and noise RNG
    come back with the checkpoint)."""
    args = TINY + ["--phase", "autoencoder", "--output_dir", str(tmp_path / "o")]
    script.main(args + ["--max_steps", "2", "--work_dir", str(tmp_path / "split")])
    script.main(args + ["--max_steps", "4", "--work_dir", str(tmp_path / "split")])
    assert "resumed the autoencoder phase from" in capsys.readouterr().out
    script.main(args + ["--max_steps", "4", "--work_dir", str(tmp_path / "whole")])
    split, whole = _weights(tmp_path / "split", "autoencoder", "generator"), _weights(tmp_path / "whole", "autoencoder", "generator")
    assert all(torch.equal(split[k], whole[k]) for k in whole)
    record = json.loads((tmp_path / "split" / "autoencoder" / "training_record.json").read_text())
    assert record["steps"] == 4


def test_mapping_phase_without_an_autoencoder_checkpoint_is_refused(script, tmp_path):
    with pytest.raises(FileNotFoundError, match="run --phase autoencoder first"):
        script.main(TINY + ["--phase", "mapping", "--work_dir", str(tmp_path / "w"), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_gan_phase_warm_start_copies_generator_and_g_ema(script, run, tmp_path):
    script.main(TINY + ["--max_steps", "0", "--init_from", str(run / "ae_out"), "--work_dir", str(tmp_path / "w"),
                        "--output_dir", str(tmp_path / "o")])
    source = StyleGAN2Generator.from_pretrained(run / "ae_out").state_dict()
    for name in ("generator", "g_ema"):
        copy = _weights(tmp_path, "w", name)
        assert all(torch.equal(source[k], copy[k]) for k in source), name


def test_warm_start_from_a_generator_of_another_config_is_refused(script, run, tmp_path):
    with pytest.raises(ValueError, match=r"--init_from .* does not fit this run's generator \(channel_max 8 there, 16 here\)"):
        script.main(TINY + ["--channel_max", "16", "--phase", "autoencoder", "--max_steps", "1", "--init_from",
                            str(run / "gan_out"), "--work_dir", str(tmp_path / "w"), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="--init_from .*nope: no generator there"):
        script.main(TINY + ["--max_steps", "1", "--init_from", str(tmp_path / "nope"), "--work_dir", str(tmp_path / "w2")])
    assert not (tmp_path / "w2").exists()


def test_mapping_phase_on_an_autoencoder_of_another_config_is_refused(script, run, tmp_path):
    args = TINY + ["--channel_max", "16", "--phase", "mapping", "--work_dir", str(run / "ae"), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="does not fit this run's models .*--channel_max"):
        script.main(args)
    assert not (tmp_path / "o").exists()


def test_edge_term_changes_the_gradient_of_a_blurred_square(script):
    """The gradient difference term pulls harder at a blurred edge than MSE alone does."""
    real = -torch.ones(1, 1, 8, 8)
    real[..., 2:6, 2:6] = 1
    blurred = F.avg_pool2d(F.pad(real, (1, 1, 1, 1), mode="replicate"), 3, stride=1).requires_grad_(True)
    (g_mse,) = torch.autograd.grad(script.reconstruction_loss(blurred, real, 0.0), blurred)
    (g_both,) = torch.autograd.grad(script.reconstruction_loss(blurred, real, 1.0), blurred)
    assert g_both.abs().sum() > 2 * g_mse.abs().sum()
