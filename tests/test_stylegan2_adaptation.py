"""GAN-IPL Stage 2 on a tiny StyleGAN2 with the tiny CLIP: layer choice, freezing, EMA, resume
through the Accelerate-driven checkpoints, mixed-precision refusal, and the real-image projector."""

import math

import pytest
import torch
from transformers import CLIPImageProcessor

from ipl_diffusion import checkpointing
from ipl_diffusion.adaptation import stylegan2 as gan
from ipl_diffusion.clip_image import CLIPImageEncoder
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator
from ipl_diffusion.projection import project

STYLE_DIM = 16


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny latency-bound models (conftest.py)


def tiny_generator(seed=0, size=32):
    torch.manual_seed(seed)
    return StyleGAN2Generator(size=size, style_dim=STYLE_DIM, n_mlp=2, channel_max=8).eval()


@pytest.fixture
def clip_parts(tiny_clip):
    model, tokenizer = tiny_clip
    image_features = CLIPImageEncoder(model, CLIPImageProcessor()).encode_images
    from ipl_diffusion.clip_text import CLIPPromptEncoder

    encoder = CLIPPromptEncoder(model, tokenizer)
    with torch.no_grad():
        src = encoder.encode_text(["photo"])[0]
        tgt = encoder.encode_text(["sketch"])[0]
    return image_features, src, tgt


def fixed_prompts(src, tgt):
    """The manual (NADA) scheme: the same pair of text features for every w."""

    def prompt_features(w):
        return src.expand(w.shape[0], -1), tgt.expand(w.shape[0], -1)

    return prompt_features


def params_by_module(generator):
    """top-level-ish module name -> {param name: tensor copy}."""
    return {name: p.detach().clone() for name, p in generator.named_parameters()}


def changed_modules(before, after, generator):
    owners = set()
    for name, value in before.items():
        if not torch.equal(value, after[name]):
            owners.add(_owner(name))
    return owners


def _owner(param_name):
    parts = param_name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("convs", "to_rgbs", "style") else parts[0]


# ----------------------------------------------------------------------------------------
# layer bookkeeping
# ----------------------------------------------------------------------------------------


def test_nada_fixed_layer_sets():
    g = tiny_generator(size=64)  # 8 convs, n_latent 10
    assert gan.nada_training_layers(g) == ["input", "conv1"] + [f"convs.{k}" for k in range(8)]
    assert gan.nada_training_layers(g, "shape") == ["input", "conv1", "convs.0", "convs.1"]
    assert gan.nada_training_layers(g, "texture") == ["input", "conv1"] + [f"convs.{k}" for k in range(2, 8)]
    assert set(gan.nada_training_layers(g, "all")) == {name for name, _ in g.named_children()}
    with pytest.raises(ValueError, match="phase"):
        gan.nada_training_layers(g, "everything")


def test_w_plus_rows_map_to_the_layers_that_consume_them():
    g = tiny_generator(size=64)
    # corrected: row 0 -> conv1, row j -> convs.{j-1}; ToRGB layers only on request
    assert gan.trainable_module_names(g, [0, 1, 2, 5]) == ["conv1", "convs.0", "convs.1", "convs.4"]
    assert gan.trainable_module_names(g, [1, 3], train_to_rgb=True) == ["to_rgb1", "convs.0", "convs.2", "to_rgbs.0"]
    # upstream NADA/IPL: [conv1, to_rgb1, *convs][j] -- one layer too coarse for j >= 2
    assert gan.trainable_module_names(g, [0, 1, 2, 5], compat=True) == ["conv1", "to_rgb1", "convs.0", "convs.3"]
    # the last row feeds only the last ToRGB, so it is no candidate unless ToRGBs train
    assert g.n_latent - 1 not in gan.candidate_rows(g)
    assert g.n_latent - 1 in gan.candidate_rows(g, train_to_rgb=True)
    # every conv can be reached (upstream could never select convs[-1])
    reached = set(gan.trainable_module_names(g, gan.candidate_rows(g)))
    assert {f"convs.{k}" for k in range(len(g.convs))} | {"conv1"} == reached


def test_select_layers_ranks_rows_by_their_sgd_step(clip_parts):
    image_features, _, tgt = clip_parts
    g = tiny_generator()
    text = torch.nn.functional.normalize(tgt[None], dim=-1)

    def global_loss(images):
        return (1 - torch.nn.functional.normalize(image_features(images), dim=-1) @ text.T).mean()

    w = g.get_latent(torch.randn(3, STYLE_DIM)).detach()
    torch.manual_seed(5)
    names, scores = gan.select_layers(g, w, global_loss, k=3, lr=0.01)
    # the same SGD step by hand, with the same noise draws
    torch.manual_seed(5)
    codes = w.unsqueeze(1).repeat(1, g.n_latent, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(global_loss(g.synthesis(codes)), codes)
    expected = (0.01 * grad).abs().mean(-1).mean(0)
    torch.testing.assert_close(scores, expected)
    rows = gan.candidate_rows(g)
    top = sorted(rows[i] for i in torch.topk(expected[rows], 3).indices.tolist())
    assert names == gan.trainable_module_names(g, top)
    # the probe leaves no gradients behind in the generator
    assert all(p.grad is None for p in g.parameters())
    # rendering the probes in chunks changes the memory, not the selection
    full = gan.select_layers(g, w, global_loss, k=3, randomize_noise=False)
    chunked = gan.select_layers(g, w, global_loss, k=3, randomize_noise=False, chunk_size=2)
    assert full[0] == chunked[0]
    torch.testing.assert_close(full[1], chunked[1])


def test_probe_shares_add_up_to_the_whole_batch(clip_parts):
    """What choose_layers does with several processes: each scores its share of the probes
    with global_batch set, and the size-weighted sum of the shares is the whole batch."""
    image_features, _, tgt = clip_parts
    g = tiny_generator()
    text = torch.nn.functional.normalize(tgt[None], dim=-1)

    def global_loss(images):
        return (1 - torch.nn.functional.normalize(image_features(images), dim=-1) @ text.T).mean()

    w = g.get_latent(torch.randn(5, STYLE_DIM)).detach()
    _, whole = gan.select_layers(g, w, global_loss, k=3, iterations=2, randomize_noise=False)
    shares = [w[rank::2] for rank in range(2)]
    parts = [gan.select_layers(g, share, global_loss, k=3, iterations=2, randomize_noise=False, global_batch=5)[1] for share in shares]
    combined = sum(len(share) * part for share, part in zip(shares, parts)) / 5
    torch.testing.assert_close(combined, whole)
    assert gan.rank_layers(g, combined, 3) == gan.rank_layers(g, whole, 3)


def test_sample_z_shares_partition_the_global_batch():
    whole = gan.sample_z(3, STYLE_DIM, 0.0, torch.Generator().manual_seed(4), "cpu", world=1)[0]
    doubled = gan.sample_z(6, STYLE_DIM, 0.0, torch.Generator().manual_seed(4), "cpu", world=1)[0]
    shares = [gan.sample_z(3, STYLE_DIM, 0.0, torch.Generator().manual_seed(4), "cpu", world=2, rank=r)[0] for r in (0, 1)]
    assert torch.equal(whole, doubled[:3])  # one process: the draw of before, unchanged
    assert torch.equal(shares[0], doubled[0::2]) and torch.equal(shares[1], doubled[1::2])


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------


def test_only_chosen_layers_change_adaptive(clip_parts, tiny_clip):
    image_features, src, tgt = clip_parts
    clip_model, _ = tiny_clip  # the instance clip_parts wraps; trainable, as a user's CLIP may be
    clip_model.requires_grad_(True)
    source = tiny_generator()
    before = params_by_module(source)
    cfg = gan.GANStage2Config(iterations=3, batch_size=2, auto_layer_k=2, auto_layer_batch=2, learning_rate=0.05, seed=0)
    trainer = gan.GANIPLTrainer(source, fixed_prompts(src, tgt), image_features, tgt, cfg)
    chosen = set()
    for _ in range(cfg.iterations):
        out = trainer.train_step()
        assert len(out["layers"]) == 2 and all(name == "conv1" or name.startswith("convs.") for name in out["layers"])
        chosen |= set(out["layers"])
    changed = changed_modules(before, params_by_module(trainer.generator), trainer.generator)
    assert changed and changed <= chosen
    # no gradient is left behind: not in G_t (zeroed after each update), not in CLIP (the
    # backward pass is restricted to the chosen layers)
    assert all(p.grad is None for p in trainer.generator.parameters())
    assert all(p.grad is None for p in clip_model.parameters())
    # the EMA moved exactly where the generator moved, and by 1 - decay of it after one step
    ema_changed = changed_modules(before, params_by_module(trainer.generator_ema), trainer.generator_ema)
    assert ema_changed == changed
    # the source generator is untouched
    assert not changed_modules(before, params_by_module(source), source)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_fixed_phase_trains_exactly_its_layers(clip_parts, max_grad_norm):
    image_features, src, tgt = clip_parts
    source = tiny_generator()
    before = params_by_module(source)
    cfg = gan.GANStage2Config(iterations=2, auto_layer_iters=0, phase="shape", learning_rate=0.05, seed=0, max_grad_norm=max_grad_norm)
    trainer = gan.GANIPLTrainer(source, fixed_prompts(src, tgt), image_features, None, cfg)
    for _ in range(cfg.iterations):
        trainer.train_step()
    changed = changed_modules(before, params_by_module(trainer.generator), trainer.generator)
    assert changed == {"input", "conv1", "convs.0", "convs.1"}


def test_ema_update_is_lerp_and_exact_for_unchanged():
    a, b = tiny_generator(0), tiny_generator(1)
    a_before = params_by_module(a)
    b.conv1.conv.weight.data.copy_(a.conv1.conv.weight.data)
    gan.ema_update(a, b, decay=0.9)
    after = params_by_module(a)
    assert torch.equal(after["conv1.conv.weight"], a_before["conv1.conv.weight"])
    b_params = params_by_module(b)
    torch.testing.assert_close(after["input.input"], 0.9 * a_before["input.input"] + 0.1 * b_params["input.input"])


def test_resume_after_kill_is_bit_exact(tmp_path, clip_parts, monkeypatch):
    """4 iterations straight == 2, a kill, and a resume from checkpoint-2 in a "new process"
    (fresh trainer, other global RNG state): identical weights, optimiser state and losses."""
    image_features, src, tgt = clip_parts
    # adaptive layer choice and style mixing: every random draw of an iteration is exercised
    cfg = dict(iterations=4, batch_size=2, auto_layer_k=2, auto_layer_batch=2, learning_rate=0.05, mixing=0.5, seed=1, checkpointing_steps=2)

    def make(output_dir):
        return gan.GANIPLTrainer(tiny_generator(), fixed_prompts(src, tgt), image_features, tgt, gan.GANStage2Config(**cfg), output_dir=output_dir)

    torch.manual_seed(0)
    straight = make(tmp_path / "straight")
    rng_before = torch.get_rng_state()
    straight.train(progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # training leaves the caller's RNG alone

    torch.manual_seed(0)
    killed = make(tmp_path / "killed")
    real_step = killed.train_step

    def dies_at_iteration_3():
        if killed.step == 2:
            raise KeyboardInterrupt  # the "kill", after checkpoint-2 was written
        return real_step()

    monkeypatch.setattr(killed, "train_step", dies_at_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        killed.train(progress=False)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path / "killed" / "checkpoints")] == ["checkpoint-2"]

    torch.manual_seed(123)  # a new process has other global RNG state
    resumed = make(tmp_path / "killed")
    g_ema = resumed.train(resume_from_checkpoint="latest", progress=False)
    assert resumed.step == 4 and len(resumed.history) == 4
    for (name, a), b in zip(straight.generator.state_dict().items(), resumed.generator.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(straight.generator_ema.state_dict().items(), g_ema.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.optimizer.optimizer.state_dict()["state"].values(), resumed.optimizer.optimizer.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == straight.history
    # losses.csv is rebuilt from the checkpoint's history: no duplicated or orphaned rows
    assert (tmp_path / "killed" / "losses.csv").read_text() == (tmp_path / "straight" / "losses.csv").read_text()
    assert (tmp_path / "killed" / "losses.csv").read_text().count("\n") == 5


def test_fp16_on_cpu_is_refused(clip_parts):
    image_features, src, tgt = clip_parts
    with pytest.raises(ValueError, match="fp16.*GPU"):
        gan.GANIPLTrainer(tiny_generator(), fixed_prompts(src, tgt), image_features, tgt, gan.GANStage2Config(mixed_precision="fp16"))


def test_nan_loss_is_a_clear_error(clip_parts):
    image_features, src, tgt = clip_parts

    def nan_prompts(w):
        return torch.full((w.shape[0], src.shape[0]), float("nan")), tgt.expand(w.shape[0], -1)

    trainer = gan.GANIPLTrainer(tiny_generator(), nan_prompts, image_features, None, gan.GANStage2Config(iterations=1, auto_layer_iters=0))
    with pytest.raises(ValueError, match="GAN-IPL Stage 2 loss term directional is nan at iteration 0"):
        trainer.train_step()


def test_config_validation():
    with pytest.raises(ValueError, match="phase"):
        gan.GANStage2Config(phase="bogus").validate()
    with pytest.raises(ValueError, match="mixed_precision"):
        gan.GANStage2Config(mixed_precision="fp8").validate()
    with pytest.raises(ValueError, match="learning_rate must be a finite number"):
        gan.GANStage2Config(learning_rate=float("nan")).validate()
    with pytest.raises(ValueError, match="target_text_features"):
        gan.GANIPLTrainer(tiny_generator(), None, None, None, gan.GANStage2Config())


# ----------------------------------------------------------------------------------------
# projection
# ----------------------------------------------------------------------------------------


def test_projection_recovers_a_generated_image():
    g = tiny_generator(3)
    with torch.no_grad():
        target, _ = g([torch.randn(2, STYLE_DIM)], randomize_noise=False)
    start = project(g, target, space="w", num_steps=1)
    result = project(g, target, space="w", num_steps=60)
    err_start = (start.images - target).pow(2).mean()
    err = (result.images - target).pow(2).mean()
    assert err < 0.25 * err_start
    assert result.latents.shape == (2, g.n_latent, STYLE_DIM)
    # deterministic for a given seed
    again = project(g, target, space="w", num_steps=60)
    torch.testing.assert_close(again.latents, result.latents)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projection_of_a_half_precision_generator_matches_float32(dtype):
    """The shipped Shapes StyleGAN2 loaded in half precision projects as in float32: the
    statistics and the latent are kept in float32 (in float16 the std of its 4096 sampled w
    overflowed to inf and step 0's loss was NaN, whatever the learning rate)."""
    from ipl_diffusion.models.stylegan2 import StyleGAN2Generator as Generator
    from ipl_diffusion.shapes import default_model_path

    folder = default_model_path("stylegan2") / "source_generator"
    full_g = Generator.from_pretrained(folder)
    with torch.no_grad():
        target, _ = full_g([torch.randn(2, full_g.style_dim, generator=torch.Generator().manual_seed(0))], randomize_noise=False)
    full = project(full_g, target, space="w", num_steps=10)
    half = project(Generator.from_pretrained(folder, torch_dtype=dtype), target, space="w", num_steps=10)
    assert half.latents.dtype == dtype and all(math.isfinite(v) for v in half.losses)
    assert half.losses[-1] < half.losses[0]
    torch.testing.assert_close(half.latents.float(), full.latents, atol=0.1, rtol=0.1)


def test_projection_encoder_hook_and_errors():
    g = tiny_generator(3)
    with torch.no_grad():
        w = g.get_latent(torch.randn(2, STYLE_DIM))
        target, _ = g([w], input_is_latent=True, randomize_noise=False)
    exact = project(g, target, num_steps=0, encoder=lambda x: w)  # a perfect "encoder"
    torch.testing.assert_close(exact.images, target)
    with pytest.raises(ValueError, match="encoder returned"):
        project(g, target, num_steps=0, encoder=lambda x: torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_steps"):
        project(g, target, num_steps=0)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        project(g, target[:, :1])
    with pytest.raises(ValueError, match="space"):
        project(g, target, space="s")


def test_projection_perceptual_term():
    g = tiny_generator(3)
    with torch.no_grad():
        target, _ = g([torch.randn(1, STYLE_DIM)], randomize_noise=False)
    calls = []

    def perceptual(x, y):
        calls.append(x.shape)
        return (x.mean(dim=(2, 3)) - y.mean(dim=(2, 3))).abs().mean()

    plain = project(g, target, num_steps=5)
    mixed = project(g, target, num_steps=5, perceptual_loss=perceptual, perceptual_weight=10.0)
    assert len(calls) == 5 and calls[0] == (1, 3, 32, 32)
    assert not torch.allclose(plain.latents, mixed.latents)
    from ipl_diffusion.projection import lpips_loss

    with pytest.raises(FileNotFoundError, match="does not exist"):
        lpips_loss("./no/such/alexnet-owt-7be5be79.pth")


# ----------------------------------------------------------------------------------------
# IPL's point: each image's own ΔT_i, and a first step that cannot dominate Adam
# ----------------------------------------------------------------------------------------


def image_specific_prompts(dim, style_dim=STYLE_DIM):
    """A deterministic per-w prompt: each w gets its own source / target text feature."""
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(style_dim, dim, generator=gen), torch.randn(style_dim, dim, generator=gen)

    def prompt_features(w):
        return w @ a, w @ b

    return prompt_features


def test_each_image_meets_its_own_text_direction(clip_parts):
    """The rows of ΔT_i reaching the loss belong to the w that rendered the same rows of the
    images (per-row pairing), and shuffling the prompts across images changes the loss."""
    image_features, _, tgt = clip_parts
    prompts = image_specific_prompts(tgt.shape[-1])
    cfg = gan.GANStage2Config(iterations=2, batch_size=3, auto_layer_iters=0, learning_rate=0.05, seed=0)
    trainer = gan.GANIPLTrainer(tiny_generator(), prompts, image_features, tgt, cfg)
    rendered, seen = [], {}
    forward = trainer.source.forward

    def recording_forward(styles, *args, **kwargs):
        rendered.append(styles[0].detach().clone())
        return forward(styles, *args, **kwargs)

    trainer.source.forward = recording_forward

    def recording_loss(src_feat, tgt_feat, src_text, tgt_text):
        seen.update(src_feat=src_feat, tgt_feat=tgt_feat, src_text=src_text, tgt_text=tgt_text)
        return gan_loss(src_feat, tgt_feat, src_text, tgt_text)

    from ipl_diffusion.losses import adaptive_directional_loss as gan_loss

    trainer.loss_fn = recording_loss
    trainer.train_step()
    trainer.train_step()  # at step 0 G_t == G_s (the tiny generator's noise weights start at 0): ΔI = 0
    w = rendered[-1]
    src_text, tgt_text = prompts(w)
    torch.testing.assert_close(seen["src_text"], src_text.float())
    torch.testing.assert_close(seen["tgt_text"], tgt_text.float())
    paired = gan_loss(seen["src_feat"], seen["tgt_feat"], seen["src_text"], seen["tgt_text"])
    shuffled = gan_loss(seen["src_feat"], seen["tgt_feat"], seen["src_text"][[1, 2, 0]], seen["tgt_text"][[1, 2, 0]])
    assert abs(float(paired) - float(shuffled)) > 1e-4


def test_first_step_gradient_is_clipped_by_default(clip_parts):
    """At step 0 G_t == G_s and ΔI is only the noise-map difference, so the raw gradient is
    large; by default (max_grad_norm 1) no update's gradient exceeds norm 1."""
    image_features, src, tgt = clip_parts
    assert gan.GANStage2Config().max_grad_norm == 1.0
    cfg = gan.GANStage2Config(iterations=3, batch_size=2, auto_layer_iters=0, learning_rate=0.01, seed=0)
    trainer = gan.GANIPLTrainer(tiny_generator(), fixed_prompts(src, tgt), image_features, tgt, cfg)
    norms, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad.norm() for p in trainer.generator.parameters() if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    records = [trainer.train_step() for _ in range(cfg.iterations)]
    assert max(norms) <= 1.0 + 1e-4
    assert records[0]["grad_norm"] > 1.0  # the raw first gradient, logged before clipping
