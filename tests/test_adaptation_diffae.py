"""Diff-IPL Stage 2 (ipl_diffusion.adaptation.diffae) on tiny random models."""

import csv
import warnings

import pytest
import torch

from ipl_diffusion import checkpointing, ddim
from ipl_diffusion.adaptation import diffae
from ipl_diffusion.adaptation.diffae_trainer import DiffAEStage2Trainer, batch_indices
from ipl_diffusion.clip_image import clip_image_features
from ipl_diffusion.configs import DiffAEStage2Config
from ipl_diffusion.adaptation.distributed import make_accelerator
from tiny_ipl import SIZE, build_tiny_ipl_pipeline


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_ipl_pipeline()


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator("no", "cpu")


@pytest.fixture(scope="module")
def cache(pipe):
    torch.manual_seed(1)
    images = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    return diffae.encode_sources(pipe.semantic_encoder, pipe.source_unet, pipe.scheduler, images, 200, 4, progress=False)


def make_trainer(pipe, cache, accelerator, output_dir=None, scheduler=None, **overrides):
    options = dict(t0=200, num_train_steps=2, num_inference_steps=3, iterations=4, batch_size=2, learning_rate=1e-3)
    options.update(overrides)
    features = clip_image_features(pipe.text_encoder, pipe.feature_extractor)
    d = pipe.text_encoder.config.projection_dim
    gen = torch.Generator().manual_seed(0)
    src, tgt = torch.randn(4, d, generator=gen), torch.randn(4, d, generator=gen)
    return DiffAEStage2Trainer(
        pipe.source_unet, scheduler or pipe.scheduler, cache, src, tgt, features, DiffAEStage2Config(**options),
        identity_features=pipe.semantic_encoder, accelerator=accelerator, output_dir=output_dir,
    )


def test_encode_sources_cache(pipe, cache):
    assert set(cache) == {"x0", "z_sem", "x_t0"}
    assert cache["z_sem"].shape == (4, 32) and cache["x_t0"].shape == (4, 3, SIZE, SIZE)
    with torch.no_grad():
        again = ddim.invert_to_t0(pipe.source_unet, cache["x0"], pipe.semantic_encoder(cache["x0"]), pipe.scheduler, 200, 4)
    torch.testing.assert_close(again, cache["x_t0"])


def test_first_step_image_direction_is_not_zero(pipe, cache, accelerator):
    """Before the first update the trainable UNet decodes exactly what the source UNet does;
    ΔI (Eq. 7) must be measured from x0 (DiffusionCLIP), or it is 0 for every image and the
    normalised loss's first gradient explodes (the old defect)."""
    trainer = make_trainer(pipe, cache, accelerator)
    with torch.no_grad():
        torch.testing.assert_close(trainer.src_image, trainer.image_features(cache["x0"]).float())
        x, z = trainer.cache["x_t0"], trainer.cache["z_sem"]
        for step in trainer._plan:
            x, _ = trainer._step(x, *step, z)
        delta = trainer.image_features(x).float() - trainer.src_image
    assert (delta.norm(dim=-1) > 1e-4).all()


def test_gradient_norm_is_clipped_by_default(pipe, cache, accelerator):
    """A first-step spike must not reach Adam: by default every update's gradient has norm
    <= max_grad_norm (1), and the pre-clip norm is logged."""
    assert DiffAEStage2Config().max_grad_norm == 1.0
    trainer = make_trainer(pipe, cache, accelerator, learning_rate=1e-3)
    seen = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer._trainable if p.grad is not None]))))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    values = [trainer.step_on([0, 1]) for _ in range(2)]
    assert len(seen) == 2 and max(seen) <= 1.0 + 1e-4
    assert all(v["grad_norm"] > 1.0 for v in values)  # the tiny model's raw gradients are larger


class ConstantEps(torch.nn.Module):
    """A noise model whose eps ignores its input: DDIM inversion is then exact up to the
    first level (DiffusionCLIP treats x0 as being at t=0, alpha_bar 0.9999)."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x, t, z_sem=None):
        return self.eps


def test_inversion_round_trip_with_constant_eps(pipe):
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    eps = torch.randn(2, 3, 8, 8)
    model = ConstantEps(eps)
    x_t0 = ddim.invert_to_t0(model, x0, None, pipe.scheduler, 300, 7)
    back = ddim.decode_from_t0(model, x_t0, None, pipe.scheduler, 300, 7)
    # The only mismatch is the final jump from alpha_bar(0) = 0.9999 to 1.
    a0 = pipe.scheduler.alphas_cumprod[0]
    expected = (x0 - (1 - a0).sqrt() * eps) / a0.sqrt()
    torch.testing.assert_close(back, expected, atol=1e-5, rtol=1e-5)
    assert (back - x0).abs().max() < 0.05


def test_training_chain_equals_inference_decoding(pipe, cache, accelerator):
    trainer = make_trainer(pipe, cache, accelerator)
    x, z = trainer.cache["x_t0"][:2], trainer.cache["z_sem"][:2]
    with torch.no_grad():
        for step in trainer._plan:
            x, _ = trainer._step(x, *step, z)
        reference = ddim.decode_from_t0(pipe.source_unet, cache["x_t0"][:2], cache["z_sem"][:2], pipe.scheduler, 200, 2)
    torch.testing.assert_close(x, reference)


def test_training_chain_follows_a_v_prediction_scheduler(pipe, cache, accelerator):
    from diffusers import DDIMScheduler

    v_scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    trainer = make_trainer(pipe, cache, accelerator, scheduler=v_scheduler)
    x, z = trainer.cache["x_t0"][:2], trainer.cache["z_sem"][:2]
    with torch.no_grad():
        for step in trainer._plan:
            x, _ = trainer._step(x, *step, z)
        as_v = ddim.decode_from_t0(pipe.source_unet, cache["x_t0"][:2], cache["z_sem"][:2], v_scheduler, 200, 2)
        as_eps = ddim.decode_from_t0(pipe.source_unet, cache["x_t0"][:2], cache["z_sem"][:2], pipe.scheduler, 200, 2)
    torch.testing.assert_close(x, as_v)
    assert (as_v - as_eps).abs().max() > 1e-3  # the conversion is not a no-op


def test_full_chain_trains_only_the_copy(pipe, cache, accelerator):
    before = {k: v.clone() for k, v in pipe.source_unet.state_dict().items()}
    clip_before = pipe.text_encoder.text_projection.weight.clone()
    trainer = make_trainer(pipe, cache, accelerator, l1_loss_weight=0.5, id_loss_weight=0.5)
    values = trainer.step_on([0, 1])
    assert set(values) == {"directional", "l1", "identity", "loss", "grad_norm"}
    assert values["loss"] == pytest.approx(values["directional"] + values["l1"] + values["identity"])
    changed = [k for k, v in trainer.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 10  # gradients reached deep into the UNet, not only conv_out
    for k, v in pipe.source_unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(pipe.text_encoder.text_projection.weight, clip_before)
    assert all(p.grad is None for p in pipe.text_encoder.parameters())
    assert all(p.grad is None for p in pipe.semantic_encoder.parameters())
    assert not trainer.unet.training  # dropout stays off


def test_directional_loss_decreases(pipe, cache, accelerator):
    trainer = make_trainer(pipe, cache, accelerator, iterations=8, learning_rate=2e-3)
    losses = [trainer.step_on([0, 1, 2, 3])["directional"] for _ in range(8)]
    assert losses[-1] < losses[0]


def test_per_step_mode_updates_after_every_step(pipe, cache, accelerator):
    trainer = make_trainer(pipe, cache, accelerator, gradient_mode="per_step", num_train_steps=3)
    trainer.step_on([0, 1])
    trainer.step_on([2, 3])
    state = trainer.optimizer.optimizer.state_dict()["state"]
    assert int(state[0]["step"]) == 2 * 3


def test_gradient_checkpointing_gives_the_same_update(pipe, cache, accelerator):
    plain = make_trainer(pipe, cache, accelerator)
    checkpointed = make_trainer(pipe, cache, accelerator, gradient_checkpointing=True)
    assert checkpointed.unet.gradient_checkpointing
    plain.step_on([0, 1])
    checkpointed.step_on([0, 1])
    for (name, a), b in zip(plain.unet.state_dict().items(), checkpointed.unet.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_after_kill_gives_identical_weights(pipe, cache, accelerator, tmp_path, monkeypatch):
    uninterrupted = make_trainer(pipe, cache, accelerator, tmp_path / "a", checkpointing_steps=2)
    uninterrupted.train(progress=False)

    killed = make_trainer(pipe, cache, accelerator, tmp_path / "b", checkpointing_steps=2)
    real_step = killed.train_step

    def dies_at_iteration_3(*args):
        if killed.step == 2:
            raise KeyboardInterrupt  # the "kill", after checkpoint-2 was written
        return real_step(*args)

    monkeypatch.setattr(killed, "train_step", dies_at_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        killed.train(progress=False)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "b" / "checkpoints")] == ["checkpoint-2"]

    torch.manual_seed(12345)  # a new process has other global RNG state
    resumed = make_trainer(pipe, cache, accelerator, tmp_path / "b", checkpointing_steps=2)
    unet = resumed.train(resume_from_checkpoint="latest", progress=False)
    assert resumed.step == 4 and len(resumed.history) == 4
    for (name, a), b in zip(uninterrupted.unet.state_dict().items(), unet.state_dict().values()):
        assert torch.equal(a, b), name
    assert (tmp_path / "b" / "losses.csv").is_file() or (tmp_path / "b" / "logs").is_dir()


def test_resume_keeps_each_step_once_in_the_loss_log(pipe, cache, accelerator, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):  # the csv log (tensorboard is an optional extra)
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    killed = make_trainer(pipe, cache, accelerator, tmp_path, checkpointing_steps=2)
    real_step = killed.train_step

    def dies_at_iteration_4(*args):
        if killed.step == 3:
            raise KeyboardInterrupt  # step 3 is logged, but the newest checkpoint is step 2
        return real_step(*args)

    monkeypatch.setattr(killed, "train_step", dies_at_iteration_4)
    with pytest.raises(KeyboardInterrupt):
        killed.train(progress=False)
    resumed = make_trainer(pipe, cache, accelerator, tmp_path, checkpointing_steps=2)
    resumed.train(resume_from_checkpoint="latest", progress=False)
    with open(tmp_path / "losses.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle)]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_carries_the_fp16_loss_scale(pipe, cache, accelerator, tmp_path, monkeypatch):
    # fp16 needs a GPU; the scale's round trip through save / resume is tested with a CPU scaler.
    monkeypatch.setattr(accelerator, "scaler", torch.amp.GradScaler("cpu", init_scale=512.0))
    trainer = make_trainer(pipe, cache, accelerator, tmp_path)
    trainer.step = 1
    trainer.save_checkpoint()
    monkeypatch.setattr(accelerator, "scaler", torch.amp.GradScaler("cpu", init_scale=2.0))
    make_trainer(pipe, cache, accelerator, tmp_path).resume("latest")
    assert accelerator.scaler.get_scale() == 512.0


def test_non_finite_loss_names_the_term(pipe, cache, accelerator):
    trainer = make_trainer(pipe, cache, accelerator)
    trainer.image_features = lambda images: torch.full((images.shape[0], trainer.src_image.shape[1]), float("nan"))
    with pytest.raises(ValueError, match="Stage 2 loss term directional is nan at iteration 0"):
        trainer.step_on([0, 1])


def test_batch_indices_are_deterministic_and_sharded():
    assert batch_indices(10, 3, 5, seed=1) == batch_indices(10, 3, 5, seed=1)
    whole = batch_indices(12, 4, 1, seed=0, world=1)
    shares = [batch_indices(12, 2, 1, seed=0, world=2, rank=r) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(whole) and not set(shares[0]) & set(shares[1])
    # an epoch visits every item once
    epoch = sum((batch_indices(12, 4, i, seed=0) for i in range(3)), [])
    assert sorted(epoch) == list(range(12))


def test_options_are_validated(pipe):
    with pytest.raises(ValueError, match="gradient_mode"):
        DiffAEStage2Config(gradient_mode="sideways")
    with pytest.raises(ValueError, match="t0"):
        ddim.check_t0(1000, pipe.scheduler)
    with pytest.raises(ValueError, match="iterations"):
        DiffAEStage2Config(iterations=0)
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        DiffAEStage2Config(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="l1_loss_weight must be a finite number"):
        DiffAEStage2Config(l1_loss_weight=float("nan"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_mixed_precision_on_cpu():
    with pytest.raises(ValueError, match="fp16.*GPU"):
        make_accelerator("fp16", "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            make_accelerator("bf16", "cpu")
        except ValueError:
            pass  # the process already holds an fp32 Accelerator: the singleton refuses, clearly
    assert any("bf16" in str(w.message) for w in caught)
