"""Stage 1 (Eq. 6): the four prompt schemes, caching, determinism, frozen CLIP/generator, NaN handling."""

import pytest
import torch
from ipl_core_testing import TinyGenerator, build_encoder, latent_pool

from ipl_diffusion import LatentMapper
from ipl_diffusion.errors import UserError
from ipl_diffusion.mapper import SharedPromptContext
from ipl_diffusion.prompt_learning import PromptLearner, encode_latent_pool, learn_prompts, stage1_losses

SOURCE, TARGET = "photo", "wall painting"
FAST = dict(stage1_batch_size=8, progress=False, label_templates="single")
ERR = dict(FAST, stage1_iterations=1)  # error cases: never a long run if the check were missing


@pytest.fixture(scope="module")
def encoder():
    return build_encoder()


@pytest.fixture(scope="module")
def pool():
    return latent_pool(24)


@pytest.fixture(scope="module")
def features(encoder, pool):
    return encode_latent_pool(encoder, pool, TinyGenerator(), batch_size=16)


def full_pool_loss(learner, encoder, pool, features):
    with torch.no_grad():
        terms = stage1_losses(
            learner.prompt_module, encoder, pool, features, SOURCE, encoder.label_features(TARGET, templates="single"),
            target_label=TARGET, logit_scale=float(encoder.clip_model.logit_scale.exp()),
        )
    return terms["L"].item()


def test_adaptive_training_reduces_the_stage1_loss(encoder, pool, features):
    untrained = learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, stage1_iterations=0, **FAST)
    trained = learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, stage1_iterations=12, **FAST)
    assert isinstance(trained.mapper, LatentMapper) and trained.context is None
    assert len(trained.history) == 12 and set(trained.history[0]) == {"L_contr", "L_domain", "L"}
    before = full_pool_loss(untrained, encoder, pool, features)
    after = full_pool_loss(trained, encoder, pool, features)
    assert after < before - 0.1, (before, after)
    # Trained mapper is frozen and in eval mode, ready for Stage 2.
    assert not trained.mapper.training and all(not p.requires_grad for p in trained.mapper.parameters())


def test_gradients_reach_only_the_mapper(encoder, pool):
    generator = TinyGenerator()
    mapper = LatentMapper(latent_dim=16, n_ctx=4, ctx_dim=encoder.hidden_size, hidden_dim=32)
    images = generator(pool[:6])
    feats = encoder.encode_images(images)
    terms = stage1_losses(mapper, encoder, pool[:6], feats, SOURCE, encoder.label_features(TARGET), target_label=TARGET)
    terms["L"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mapper.parameters())
    assert all(p.grad is None for p in encoder.clip_model.parameters())
    assert all(p.grad is None for p in generator.parameters())


def test_clip_and_generator_are_unchanged_by_training(encoder, pool):
    generator = TinyGenerator()
    clip_before = {k: v.clone() for k, v in encoder.clip_model.state_dict().items()}
    generator_before = generator.weight.clone()
    learn_prompts(encoder, pool, SOURCE, TARGET, generate=generator, stage1_iterations=3, **FAST)
    assert all(torch.equal(v, encoder.clip_model.state_dict()[k]) for k, v in clip_before.items())
    assert torch.equal(generator.weight, generator_before)


def test_seeded_determinism(encoder, pool, features):
    runs = [
        learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, stage1_iterations=3, seed=seed, **FAST)
        for seed in (5, 5, 6)
    ]
    assert runs[0].history == runs[1].history
    for a, b in zip(runs[0].mapper.parameters(), runs[1].mapper.parameters()):
        assert torch.equal(a, b)
    assert runs[0].history != runs[2].history


def test_cached_features_give_the_same_training_with_far_fewer_generator_calls(encoder, pool):
    cached_gen, fresh_gen = TinyGenerator(), TinyGenerator()
    common = dict(stage1_iterations=4, encode_batch_size=16, **FAST)
    cached = learn_prompts(encoder, pool, SOURCE, TARGET, generate=cached_gen, **common)
    fresh = learn_prompts(encoder, pool, SOURCE, TARGET, generate=fresh_gen, cache_image_features=False, **common)
    assert cached_gen.calls == 2  # 24 latents in batches of 16, once
    assert fresh_gen.calls == 4  # every iteration, like the released code
    for a, b in zip(cached.history, fresh.history):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_precomputed_features_equal_the_generator_path(encoder, pool, features):
    from_features = learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, stage1_iterations=2, **FAST)
    from_generator = learn_prompts(encoder, pool, SOURCE, TARGET, generate=TinyGenerator(), stage1_iterations=2, **FAST)
    for a, b in zip(from_features.history, from_generator.history, strict=True):
        assert a == pytest.approx(b, rel=1e-6)


def test_manual_scheme_single_template_option(encoder, pool):
    learner = learn_prompts(encoder, pool, SOURCE, TARGET, scheme="manual", **FAST)  # FAST: label_templates="single"
    assert learner.history == [] and isinstance(learner.prompt_module, SharedPromptContext)
    with torch.no_grad():
        feats = learner.text_features(pool[:3], TARGET)
        expected = encoder.encode_text([f"a photo of a {TARGET}."])
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(feats, expected.expand(3, -1), rtol=0, atol=1e-6)


def test_manual_scheme_is_nadas_template_averaged_direction(encoder, pool):
    from ipl_diffusion.templates import get_templates

    options = dict(FAST, label_templates="imagenet")
    learner = learn_prompts(encoder, pool, SOURCE, TARGET, scheme="manual", **options)
    with torch.no_grad():
        feats = learner.text_features(pool[:3], TARGET)
        # independent: NADA's compute_text_direction averages unit features over the templates
        each = encoder.encode_text([t.format(TARGET) for t in get_templates("imagenet")])
        expected = (each / each.norm(dim=-1, keepdim=True)).mean(0)
    assert len(get_templates("imagenet")) == 80
    torch.testing.assert_close(feats, expected.expand(3, -1), rtol=0, atol=1e-5)
    assert not torch.allclose(feats[0], learner.encoder.encode_text([f"a photo of a {TARGET}"])[0], atol=1e-3)


def test_random_scheme_is_an_untrained_mapper(encoder, pool):
    a = learn_prompts(encoder, pool, SOURCE, TARGET, scheme="random", **FAST)
    b = learn_prompts(encoder, pool, SOURCE, TARGET, scheme="adaptive", stage1_iterations=0, **FAST)
    assert a.history == [] and isinstance(a.mapper, LatentMapper)
    for p, q in zip(a.mapper.parameters(), b.mapper.parameters()):  # same seeded init, no training
        assert torch.equal(p, q)
    with torch.no_grad():
        feats = a.text_features(pool[:3], TARGET)
    assert feats.shape == (3, encoder.projection_dim)
    assert not torch.allclose(feats[0], feats[1])  # image-specific even untrained


def test_learned_scheme_trains_one_shared_context(encoder, pool, features):
    learner = learn_prompts(encoder, pool, SOURCE, TARGET, scheme="learned", image_features=features,
                            stage1_iterations=4, context="a photo of a", **FAST)
    assert learner.mapper is None and learner.context.shape == (4, encoder.hidden_size)
    assert not torch.equal(learner.context, encoder.context_embeddings("a photo of a"))  # it moved (CoOp init)
    with torch.no_grad():
        feats = learner.text_features(pool[:3], TARGET)
    torch.testing.assert_close(feats[0], feats[2])  # shared by every image


def test_context_phrase_sets_n_ctx_in_bpe_tokens(encoder, pool):
    phrase = "an ukiyo-e painting of"  # 4 words, more BPE tokens
    learner = learn_prompts(encoder, pool, SOURCE, TARGET, scheme="random", context=phrase, **FAST)
    assert learner.n_ctx == encoder.count_tokens(phrase) > 4
    assert learner.prompt_vectors(pool[:2]).shape == (2, learner.n_ctx, encoder.hidden_size)


def test_source_regulariser_option(encoder, pool, features):
    learner = learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, stage1_iterations=1,
                            lambda_source=0.5, **FAST)
    assert "L_domain_source" in learner.history[0]


def test_direction_regulariser_option_is_the_directional_loss_of_the_prompts(encoder, pool, features):
    import torch.nn.functional as F

    from ipl_diffusion.losses import directional_domain_regularization_loss

    mapper = LatentMapper(latent_dim=16, n_ctx=4, ctx_dim=encoder.hidden_size, hidden_dim=32)
    y_s, y_t = encoder.label_features(SOURCE, templates="single"), encoder.label_features(TARGET, templates="single")
    with torch.no_grad():
        terms = stage1_losses(mapper, encoder, pool[:6], features[:6], SOURCE, y_t, target_label=TARGET,
                              source_label_features=y_s, domain_regularizer="direction")
        vectors = mapper(pool[:6])
        src, tgt = encoder.encode_prompt_vectors(vectors, SOURCE), encoder.encode_prompt_vectors(vectors, TARGET)
    # Independently: 1 - cos(Norm(T_i) - Norm(S_i), Norm(Y_t) - Norm(Y_s)), averaged.
    delta_t = F.normalize(tgt.double(), dim=-1) - F.normalize(src.double(), dim=-1)
    delta_y = F.normalize(y_t.double(), dim=-1) - F.normalize(y_s.double(), dim=-1)
    expected = (1 - F.cosine_similarity(delta_t, delta_y[None], dim=-1)).mean()
    assert terms["L_domain"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert terms["L_domain"].item() == pytest.approx(directional_domain_regularization_loss(src, tgt, y_s, y_t).item(), abs=1e-6)
    with pytest.raises(UserError, match="source_label_features"):
        stage1_losses(mapper, encoder, pool[:6], features[:6], SOURCE, y_t, target_label=TARGET, domain_regularizer="direction")
    # Through learn_prompts: the label direction is built from the labels, and trained prompts follow it.
    learner = learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, stage1_iterations=6,
                            domain_regularizer="direction", **FAST)
    assert learner.history[-1]["L_domain"] < learner.history[0]["L_domain"]
    eq5 = learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, stage1_iterations=1, **FAST)
    first = learner.history[0]
    assert first["L_contr"] == pytest.approx(eq5.history[0]["L_contr"], abs=1e-6)  # same seed: same batch and mapper
    assert abs(first["L_domain"] - eq5.history[0]["L_domain"]) > 1e-3  # another regulariser on it
    with pytest.raises(UserError, match="domain_regularizer"):
        learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, domain_regularizer="label", **ERR)


def test_nan_in_a_loss_term_stops_with_the_terms_name(encoder, pool, features, monkeypatch):
    with pytest.raises(UserError, match="logit_scale must be a finite number"):  # refused before any work
        learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, stage1_iterations=2,
                      logit_scale=float("nan"), **FAST)
    # NaN prompt features (as a diverging mapper would give): L_contr (Eq. 4) is the first NaN term.
    real_encode = encoder.encode_prompt_vectors
    monkeypatch.setattr(encoder, "encode_prompt_vectors", lambda *a, **k: real_encode(*a, **k) * float("nan"))
    with pytest.raises(FloatingPointError, match="L_contr is nan at iteration 0"):
        learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, stage1_iterations=2, **FAST)
    monkeypatch.setattr(encoder, "encode_prompt_vectors", real_encode)
    nan_label = torch.full((encoder.projection_dim,), float("nan"))
    monkeypatch.setattr(encoder, "label_features", lambda label, templates="imagenet": nan_label)
    with pytest.raises(FloatingPointError, match="L_domain is nan at iteration 0"):
        learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, stage1_iterations=2, **FAST)


def test_bad_inputs_are_clear_errors(encoder, pool, features):
    with pytest.raises(ValueError, match=r"scheme must be one of \(.manual., .learned., .random., .adaptive.\); got .coop."):
        learn_prompts(encoder, pool, SOURCE, TARGET, scheme="coop", **ERR)
    with pytest.raises(ValueError, match="exactly one of image_features"):
        learn_prompts(encoder, pool, SOURCE, TARGET, **ERR)
    with pytest.raises(ValueError, match="exactly one of image_features"):
        learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, generate=TinyGenerator(), **ERR)
    with pytest.raises(ValueError, match=r"image_features must be \(24, 32\)"):
        learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features[:5], **ERR)
    with pytest.raises(ValueError, match="at least 2 latents"):
        learn_prompts(encoder, pool[:1], SOURCE, TARGET, image_features=features[:1], **ERR)
    with pytest.raises(ValueError, match="NaN/inf"):
        learn_prompts(encoder, pool * float("nan"), SOURCE, TARGET, image_features=features, **ERR)
    with pytest.raises(ValueError, match="empty or blank"):
        learn_prompts(encoder, pool, SOURCE, "  ", image_features=features, **ERR)
    long_label = "wall painting " * 40
    n = encoder.count_tokens(long_label)
    with pytest.raises(ValueError, match=rf"{n} label tokens \+ 4 context slots"):
        learn_prompts(encoder, pool, SOURCE, long_label, image_features=features, **ERR)


def test_generator_returning_bad_images_is_caught(encoder, pool):
    with pytest.raises(ValueError, match="NaN/inf images"):
        learn_prompts(encoder, pool, SOURCE, TARGET, generate=lambda w: TinyGenerator()(w) * float("nan"),
                      stage1_iterations=1, **FAST)
    with pytest.raises(ValueError, match="expected"):
        learn_prompts(encoder, pool, SOURCE, TARGET, generate=lambda w: torch.zeros(1, 3, 8, 8),
                      stage1_iterations=1, **FAST)


def test_prompt_learner_save_and_load(tmp_path, encoder, pool, features):
    learner = learn_prompts(encoder, pool, SOURCE, TARGET, image_features=features, stage1_iterations=2, **FAST)
    learner.save_pretrained(tmp_path)
    assert (tmp_path / "prompt_module" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = PromptLearner.from_pretrained(tmp_path, encoder)
    assert (loaded.scheme, loaded.source_label, loaded.target_label) == ("adaptive", SOURCE, TARGET)
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_features(pool[:4], TARGET), learner.text_features(pool[:4], TARGET))
    with pytest.raises(FileNotFoundError, match="prompt_learner.json"):
        PromptLearner.from_pretrained(tmp_path / "nothing", encoder)


def test_learn_prompts_has_at_most_12_parameters_and_takes_a_latent_sampler(encoder):
    """The project's limit for a public function; fresh latents come as ``latents`` itself (a
    sampler ``(b, generator) -> (b, latent_dim)``), drawn once per iteration."""
    import inspect

    named = [p for p in inspect.signature(learn_prompts).parameters.values() if p.kind is not p.VAR_KEYWORD]
    assert len(named) <= 12, [p.name for p in named]
    drawn = []

    def sampler(batch, rng):
        drawn.append(batch)
        return torch.randn(batch, 16, generator=rng)

    learner = learn_prompts(encoder, sampler, SOURCE, TARGET, generate=TinyGenerator(), stage1_iterations=2, **FAST)
    assert len(learner.history) == 2 and drawn == [2, 8, 8]  # the width probe, then one batch per iteration
