"""Stage 1 of IPL: prompt learning (Eq. 6), and the four prompt schemes of the ablation (§4.4).

``learn_prompts`` trains the prompt generator on a pool of source latents with

    L = L_contr + λ · L_domain                                                        (Eq. 6)

where ``L_contr`` (Eq. 3-4) pulls each source image towards its own prompt ``M_s^i`` and away
from the other images' prompts, and ``L_domain`` (Eq. 5) keeps the same prompt vectors with the
*target* label close to the target label's template-averaged CLIP feature.

Schemes (one option, ``scheme=``):

========== ================================================ ==========================
scheme     prompt vectors                                   training
========== ================================================ ==========================
manual     none: NADA's template-averaged label features    none (StyleGAN-NADA)
learned    one shared learned set (CoOp)                    Eq. 6, same loss
random     an untrained latent mapper                       none
adaptive   the IPL latent mapper ``F(w)`` (Eq. 2)           Eq. 6
========== ================================================ ==========================

The generator and CLIP are frozen. The released code re-generates and re-encodes ``G_s(w)``
every iteration from *fresh* latents (``latents=`` a sampler, what GAN-IPL does here too). With a
fixed pool, ``E_I(G_s(w))`` is computed **once** (batched, under ``no_grad``) and cached
(``benchmarks/stage1_cache.py`` measures the speed-up); the pool must be large (thousands),
because a mapper trained on a few dozen latents memorises them and its prompts do not carry
over to the latents Stage 2 feeds it (:func:`prompt_retrieval` on held-out latents shows it).
Stage 1 is generator-agnostic: pass ``image_features`` (N, D) or a callable
``generate(latents) -> images`` ((B, 3, H, W) in [-1, 1]); StyleGAN (``w``) and DiffAE
(``z_sem``) plug in the same way.

Defaults follow the paper (300 iterations, batch 32, m = 4, λ = 1; the paper picks λ per
domain in [1, 10] by Inception Score) and the released code (Adam with lr 0.05 for the
equalised-lr mapper, default betas, no schedule, symmetric InfoNCE with CLIP's logit
scale). The learned shared context (no equalised-lr scaling) uses Adam with lr 2e-3.

The result is a :class:`PromptLearner`: it holds the trained prompt module (a
``LatentMapper`` or a ``SharedPromptContext``, both diffusers ``ModelMixin``) and gives Stage 2
the per-image prompt features through :meth:`PromptLearner.text_features`.
"""

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .clip_text import DEFAULT_CONTEXT
from .configs import DOMAIN_REGULARIZERS, PROMPT_SCHEMES, TRAINED_SCHEMES, Stage1Config
from .errors import UserError, UserFileNotFoundError, check_finite
from .losses import contrastive_loss, directional_domain_regularization_loss, domain_regularization_loss
from .mapper import LatentMapper, SharedPromptContext
from .outputs import atomic_write_text

PromptScheme = Literal["manual", "learned", "random", "adaptive"]

DEFAULT_LEARNING_RATES = {"adaptive": 0.05, "learned": 2e-3}

_CONFIG_NAME = "prompt_learner.json"


def encode_latent_pool(encoder, latents, generate, batch_size=32):
    """``E_I(G_s(w))`` for a whole latent pool, batched and without gradients.

    Args:
        encoder: a :class:`~ipl_diffusion.clip_text.CLIPPromptEncoder` with an image processor.
        latents: ``(N, latent_dim)`` latents.
        generate: callable ``latents (b, latent_dim) -> images (b, 3, H, W)`` in ``[-1, 1]``.
        batch_size: latents per generator call.

    Returns:
        ``(N, D)`` raw image features on CLIP's device.

    Raises:
        UserError: the generator returns a wrong batch size / shape, or NaN/inf images.
    """
    chunks = []
    with torch.no_grad():
        for start in range(0, latents.shape[0], batch_size):
            batch = latents[start : start + batch_size]
            images = generate(batch)
            if not torch.is_tensor(images) or images.ndim != 4 or images.shape[0] != batch.shape[0]:
                shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
                raise UserError(
                    f"The generator returned {shape} for {batch.shape[0]} latents; expected ({batch.shape[0]}, 3, H, W)."
                )
            if not torch.isfinite(images).all():
                raise UserError(f"The generator produced NaN/inf images for latents {start}..{start + len(batch) - 1}.")
            chunks.append(encoder.encode_images(images))
    return torch.cat(chunks)


def stage1_losses(
    prompt_module,
    encoder,
    latents,
    image_features,
    source_label,
    target_label_features,
    *,
    lambda_domain=1.0,
    logit_scale=100.0,
    contrastive_form="infonce",
    target_label=None,
    source_label_features=None,
    lambda_source=0.0,
    domain_regularizer="feature",
):
    """The Stage-1 objective (Eq. 6) on one batch, term by term.

    Args:
        prompt_module: ``LatentMapper`` / ``SharedPromptContext``: ``(B, latent_dim) -> (B, m, k)``.
        encoder: ``CLIPPromptEncoder``.
        latents: ``(B, latent_dim)``.
        image_features: ``(B, D)`` raw ``E_I(G_s(w))`` of the same latents.
        source_label: ``Y_s``; ``target_label``: ``Y_t`` (required).
        target_label_features: ``(D,)`` ``E_T(Y_t)`` (template average).
        lambda_domain: λ of Eq. 6.
        logit_scale, contrastive_form: see :func:`~ipl_diffusion.losses.contrastive_loss`.
        source_label_features, lambda_source: the released code's optional source-domain
            regulariser (``--lambda_src``, 0 by default), weighted ``λ · lambda_source``.
        domain_regularizer: ``"feature"``, Eq. 5; ``"direction"`` (not in the paper), the
            prompt direction towards the label direction
            (:func:`~ipl_diffusion.losses.directional_domain_regularization_loss`), which needs
            ``source_label_features``.

    Returns:
        dict of 0-d tensors: ``"L_contr"``, ``"L_domain"``, (``"L_domain_source"``), ``"L"``.

    Raises:
        UserError: no ``target_label``; an unknown ``domain_regularizer``; ``"direction"``
            without ``source_label_features``.
    """
    if target_label is None:
        raise UserError("stage1_losses needs target_label.")
    vectors = prompt_module(latents)
    source_text = encoder.encode_prompt_vectors(vectors, source_label)
    target_text = encoder.encode_prompt_vectors(vectors, target_label)
    if domain_regularizer == "direction":
        if source_label_features is None:
            raise UserError("domain_regularizer='direction' needs source_label_features (E_T(Y_s)).")
        domain = directional_domain_regularization_loss(source_text, target_text, source_label_features, target_label_features)
    elif domain_regularizer == "feature":
        domain = domain_regularization_loss(target_text, target_label_features)
    else:
        raise UserError(f"domain_regularizer must be one of {DOMAIN_REGULARIZERS}, got {domain_regularizer!r}")
    terms = {
        "L_contr": contrastive_loss(image_features, source_text, logit_scale=logit_scale, form=contrastive_form),
        "L_domain": domain,
    }
    total = terms["L_contr"] + lambda_domain * terms["L_domain"]
    if lambda_source:
        terms["L_domain_source"] = domain_regularization_loss(source_text, source_label_features)
        total = total + lambda_domain * lambda_source * terms["L_domain_source"]
    terms["L"] = total
    return terms


@dataclass
class PromptLearner:
    """Result of Stage 1: the prompt module of one scheme plus what Stage 2 needs from it.

    Attributes:
        encoder: the ``CLIPPromptEncoder`` used (frozen CLIP).
        prompt_module: ``LatentMapper`` (``adaptive``, ``random``) or ``SharedPromptContext``
            (``learned``, ``manual``); frozen and in eval mode after training. Save it with
            ``save_pretrained`` (or this object's :meth:`save_pretrained`).
        scheme: one of :data:`PROMPT_SCHEMES`.
        source_label, target_label: the domain labels ``Y_s``, ``Y_t``.
        history: per-iteration loss values (floats), empty for untrained schemes; rows at
            which the held-out retrieval was measured also carry ``"heldout_retrieval"``.
        direction_templates: ``manual`` only: the template set whose average is each label's
            feature (NADA's fixed direction); ``None`` for the other schemes.
        heldout_retrieval: the last held-out prompt retrieval (:func:`prompt_retrieval`), or
            ``None`` when no held-out latents were given.
    """

    encoder: object
    prompt_module: torch.nn.Module
    scheme: str
    source_label: str
    target_label: str
    history: list = field(default_factory=list)
    direction_templates: str | None = None
    heldout_retrieval: float | None = None

    @property
    def mapper(self):
        """The trained/untrained ``LatentMapper`` (``adaptive``/``random``), else ``None``."""
        return self.prompt_module if isinstance(self.prompt_module, LatentMapper) else None

    @property
    def context(self):
        """The shared ``(m, k)`` prompt vectors (``learned``/``manual``), else ``None``."""
        return self.prompt_module.ctx if isinstance(self.prompt_module, SharedPromptContext) else None

    @property
    def n_ctx(self):
        return int(self.prompt_module.config.n_ctx)

    def prompt_vectors(self, latents):
        """``(B, latent_dim)`` -> ``(B, m, k)`` prompt vectors ``[V]^i_1..[V]^i_m``."""
        return self.prompt_module(latents)

    def text_features(self, latents, label):
        """Per-image prompt features ``E_T(M^i)`` for ``label`` -- the terms of ΔT_i in Eq. 8.

        Args:
            latents: ``(B, latent_dim)`` (``w`` / ``z_sem``; ignored by shared-context schemes
                except for their count).
            label: domain label (``source_label`` for ``M_s^i``, ``target_label`` for ``M_t^i``).

        Returns:
            ``(B, D)`` raw features (gradients flow to the prompt module if it is unfrozen;
            Stage 2 calls this under ``torch.no_grad()``).
        """
        if self.direction_templates is not None:
            # NADA's fixed direction: the template-averaged label feature, the same for every row.
            feature = self.encoder.label_features(label, templates=self.direction_templates)
            return feature.unsqueeze(0).expand(latents.shape[0], -1)
        module_device = next(self.prompt_module.parameters()).device
        return self.encoder.encode_prompt_vectors(self.prompt_module(latents.to(module_device)), label)

    def save_pretrained(self, save_directory):
        """Write ``prompt_learner.json``, ``history.csv`` (Stage 1's loss terms and held-out
        retrieval per iteration) and the module (``save_pretrained``, safetensors) under
        ``save_directory/prompt_module``. The files are written atomically (temp file + rename)."""
        os.makedirs(save_directory, exist_ok=True)
        self.prompt_module.save_pretrained(os.path.join(save_directory, "prompt_module"))
        _write_history(self.history, os.path.join(save_directory, "history.csv"))
        meta = {
            "scheme": self.scheme,
            "source_label": self.source_label,
            "target_label": self.target_label,
            "module_class": type(self.prompt_module).__name__,
            "anchor_addition": bool(self.encoder.anchor_addition),
            "anchor_template": self.encoder.anchor_template,
            "context": self.encoder.context,
            "direction_templates": self.direction_templates,
            "heldout_retrieval": self.heldout_retrieval,
        }
        atomic_write_text(os.path.join(save_directory, _CONFIG_NAME), json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory, encoder):
        """Load what :meth:`save_pretrained` wrote, attached to ``encoder``.

        Raises:
            FileNotFoundError: ``prompt_learner.json`` or the module folder is missing.
            ValueError: unknown scheme / module class.
        """
        path = os.path.join(directory, _CONFIG_NAME)
        if not os.path.isfile(path):
            raise UserFileNotFoundError(f"{path} not found: {directory!r} is not a saved PromptLearner folder.")
        with open(path) as f:
            meta = json.load(f)
        classes = {"LatentMapper": LatentMapper, "SharedPromptContext": SharedPromptContext}
        if meta.get("scheme") not in PROMPT_SCHEMES or meta.get("module_class") not in classes:
            raise UserError(f"{path}: unknown scheme/module {meta.get('scheme')!r}/{meta.get('module_class')!r}.")
        module = classes[meta["module_class"]].from_pretrained(os.path.join(directory, "prompt_module"))
        module = module.to(encoder.device).requires_grad_(False).eval()
        learner = cls(encoder, module, meta["scheme"], meta["source_label"], meta["target_label"])
        learner.direction_templates = meta.get("direction_templates")
        learner.heldout_retrieval = meta.get("heldout_retrieval")
        return learner


def _write_history(history, path):
    """Stage 1's per-iteration records as CSV (``iteration`` then one column per term; the
    held-out retrieval is empty where it was not measured)."""
    import csv
    import io

    names = list(dict.fromkeys(k for record in history for k in record))
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["iteration", *names])
    for i, record in enumerate(history, start=1):
        writer.writerow([i, *(f"{record[k]:.6g}" if k in record else "" for k in names)])
    atomic_write_text(path, text.getvalue())


def _resolve_n_ctx(encoder, n_ctx, context):
    """Context slots are counted in BPE tokens, not words: a phrase sets ``n_ctx`` to its token count."""
    if context is not None:
        return encoder.count_tokens(encoder.validate_context(context))
    if int(n_ctx) < 1:
        raise UserError(f"n_ctx must be >= 1, got {n_ctx}.")
    return int(n_ctx)


def prompt_retrieval(learner, latents, image_features, batch_size=32):
    """Held-out prompt retrieval: does each image find its *own* source prompt?

    For consecutive batches of ``batch_size`` latents, the fraction of images ``i`` whose most
    similar prompt feature ``E_T(M_s^j)`` (cosine with ``E_I(G_s(w^i))``, Eq. 3) is ``j = i``.
    Chance is ``1 / batch_size``; a mapper that learned image-specific prompts scores well
    above it on latents it never trained on. A last batch of fewer than 2 latents is dropped.

    Args:
        learner: a :class:`PromptLearner`.
        latents: ``(N, latent_dim)``; image_features: ``(N, D)`` raw CLIP image features.

    Returns:
        top-1 accuracy in ``[0, 1]`` (float).
    """
    hits = total = 0
    with torch.no_grad():
        for start in range(0, latents.shape[0], batch_size):
            w, feats = latents[start : start + batch_size], image_features[start : start + batch_size]
            if w.shape[0] < 2:
                break
            text = learner.text_features(w, learner.source_label).float().to(feats.device)
            sim = F.normalize(feats.float(), dim=-1) @ F.normalize(text, dim=-1).t()
            hits += int((sim.argmax(dim=1) == torch.arange(w.shape[0], device=sim.device)).sum())
            total += w.shape[0]
    return hits / max(total, 1)


def _build_prompt_module(scheme, encoder, prompt_module, context, m, latent_dim, rng):
    """The scheme's prompt module: a ``SharedPromptContext`` (manual / learned) or a
    ``LatentMapper`` (random / adaptive), new (seeded by ``rng``) unless one is given."""
    if scheme in ("manual", "learned"):
        if prompt_module is not None and not isinstance(prompt_module, SharedPromptContext):
            raise UserError(f"scheme={scheme!r} uses a SharedPromptContext, got {type(prompt_module).__name__}.")
        if prompt_module is None:
            if context is not None:
                prompt_module = SharedPromptContext.from_vectors(encoder.context_embeddings(context), latent_dim)
            else:
                prompt_module = SharedPromptContext(n_ctx=m, ctx_dim=encoder.hidden_size, latent_dim=latent_dim)
                with torch.no_grad():
                    prompt_module.ctx.copy_(
                        torch.randn(prompt_module.ctx.shape, generator=rng) * prompt_module.config.init_std
                    )
    elif prompt_module is None:
        prompt_module = LatentMapper(latent_dim=latent_dim, n_ctx=m, ctx_dim=encoder.hidden_size)
        prompt_module.reset_parameters(generator=rng)
    elif not isinstance(prompt_module, LatentMapper):
        raise UserError(f"scheme={scheme!r} uses a LatentMapper, got {type(prompt_module).__name__}.")
    cfg = prompt_module.config
    if cfg.ctx_dim != encoder.hidden_size or (getattr(cfg, "latent_dim", None) not in (None, latent_dim)):
        raise UserError(
            f"The prompt module expects latent_dim={cfg.latent_dim}, ctx_dim={cfg.ctx_dim}, but the latent pool has "
            f"{latent_dim} and the CLIP text width is {encoder.hidden_size}."
        )
    return prompt_module.to(encoder.device)


def _check_pool(latents):
    """``(pool on no device yet, sampler, latent_dim)`` of ``learn_prompts``' ``latents``: a
    ``(N, latent_dim)`` pool (sampler None) or a sampler of fresh latents (pool None), which
    draws one sample to learn the width."""
    if callable(latents):
        probe = latents(2, torch.Generator().manual_seed(0))
        return None, latents, int(probe.shape[-1])
    if not torch.is_tensor(latents) or latents.ndim != 2 or latents.shape[0] < 1:
        raise UserError(f"latents must be a (N, latent_dim) tensor or a sampler (b, torch.Generator) -> "
                        f"(b, latent_dim), got {getattr(latents, 'shape', latents)}.")
    if not torch.isfinite(latents).all():
        raise UserError("The latent pool contains NaN/inf values.")
    return latents, None, int(latents.shape[1])


def _pool_features(encoder, latents, image_features, generate, cache, encode_batch_size):
    """The pool's image features ``(N, D)`` (given, or encoded once), or ``None`` when every
    step re-generates its images."""
    if (image_features is None) == (generate is None):
        raise UserError("Pass exactly one of image_features (N, D) or generate (latents -> images).")
    if image_features is not None:
        if latents is None or (not torch.is_tensor(image_features) or image_features.ndim != 2
                               or image_features.shape != (latents.shape[0], encoder.projection_dim)):
            expected = (None if latents is None else latents.shape[0], encoder.projection_dim)
            raise UserError(
                f"image_features must be {expected} to match the latent pool, got "
                f"{tuple(getattr(image_features, 'shape', ()))}."
            )
        if not torch.isfinite(image_features).all():
            raise UserError("image_features contain NaN/inf values.")
        return image_features.detach().to(encoder.device)
    if latents is not None and cache:
        return encode_latent_pool(encoder, latents, generate, encode_batch_size)
    return None


def learn_prompts(
    encoder,
    latents,
    source_label,
    target_label,
    config: Stage1Config | None = None,
    *,
    image_features=None,
    generate=None,
    heldout=None,
    prompt_module=None,
    seed=0,
    progress=True,
    target_label_features=None,
    **options,
):
    """Stage 1 (Eq. 6): learn prompt vectors for ``source_label -> target_label``.

    Args:
        encoder: ``CLIPPromptEncoder`` (frozen CLIP; needs an image processor when ``generate`` is used).
        latents: ``(N, latent_dim)`` pool of source latents (StyleGAN ``w`` / DiffAE ``z_sem``),
            or a sampler, a callable ``(b, torch.Generator) -> (b, latent_dim)`` that draws
            *fresh* latents every iteration (with ``generate``), as the released code does; a
            mapper trained on a small fixed pool memorises it and does not generalise to the
            fresh latents Stage 2 feeds it.
        source_label, target_label: ``Y_s``, ``Y_t`` (e.g. ``"photo"``, ``"wall painting"``).
        config: :class:`~ipl_diffusion.configs.Stage1Config` (scheme, λ, iterations, batch,
            lr, m, templates, ...); ``options`` override its fields by name.
        image_features: ``(N, D)`` precomputed raw ``E_I(G_s(latents))``; or
        generate: callable ``(b, latent_dim) -> (b, 3, H, W)`` images in ``[-1, 1]`` (frozen ``G_s``).
            Exactly one of the two (neither is needed for ``manual``/``random``).
        heldout: ``(latents (M, latent_dim), image_features (M, D))`` never trained on; their
            :func:`prompt_retrieval` is measured every ``heldout_every`` iterations and at the
            end (progress bar, ``history``, ``learner.heldout_retrieval``).
        prompt_module: a pre-built ``LatentMapper`` (adaptive/random) to use instead of a new one.
        seed: seeds mapper init and latent / batch sampling through a private
            ``torch.Generator`` (global RNG untouched); same seed + inputs -> same result.
        progress: show a tqdm bar.
        target_label_features: ``(D,)`` Eq. 5's anchor in place of ``target_label``'s template
            average, e.g. an image target's
            (:func:`ipl_diffusion.adaptation.image_target.domain_anchor`); ``None``: the label's.

    Returns:
        :class:`PromptLearner`.

    Raises:
        UserError: an unknown option, a value out of range, bad shapes, labels (empty / too
            long, with token counts), a batch of fewer than 2 latents.
        NonFiniteLossError (a ``UserError`` and a ``FloatingPointError``): a loss term became
            NaN / inf (the message names the term and the iteration).
    """
    from ipl_diffusion.configs import make_config

    cfg = make_config(Stage1Config, dataclasses.asdict(config) if config is not None else {}, options)
    rng = torch.Generator(device="cpu").manual_seed(int(seed))
    latents, sample_latents, latent_dim = _check_pool(latents)
    if latents is not None:
        latents = latents.detach().to(device=encoder.device, dtype=torch.float32)
    context = cfg.context
    if context is None and cfg.scheme == "manual":
        context = encoder.context or DEFAULT_CONTEXT
    m = _resolve_n_ctx(encoder, cfg.n_ctx, context)
    _warn_anchor_context(encoder, context)
    source_label = encoder.validate_label(source_label, n_ctx=m)
    target_label = encoder.validate_label(target_label, n_ctx=m)
    prompt_module = _build_prompt_module(cfg.scheme, encoder, prompt_module, context, m, latent_dim, rng)
    learner = PromptLearner(encoder, prompt_module, cfg.scheme, source_label, target_label)
    if cfg.scheme == "manual":
        learner.direction_templates = cfg.label_templates
    if cfg.scheme in TRAINED_SCHEMES and cfg.stage1_iterations > 0:
        pool_features = _pool_features(encoder, latents, image_features, generate, cfg.cache_image_features,
                                       cfg.encode_batch_size)
        _train(learner, latents, pool_features, generate, sample_latents, heldout, rng, cfg, progress,
               target_label_features)
    prompt_module.requires_grad_(False).eval()
    if heldout is not None:
        learner.heldout_retrieval = prompt_retrieval(learner, *heldout)
    return learner


def _warn_anchor_context(encoder, context):
    if encoder.anchor_addition and context is not None and encoder.validate_context(context) != encoder.context:
        # The anchor text is built from the encoder's context phrase, as the released code builds it
        # from --ctx_init; a different phrase here would silently mix two prompts.
        warnings.warn(
            f"Anchor addition uses the encoder's context {encoder.context!r}, not {context!r}; build the "
            f"CLIPPromptEncoder with context={context!r} to anchor on the same phrase.",
            stacklevel=3,
        )


def _next_batch(latents, pool_features, generate, sample_latents, batch, rng, device):
    """``(w (B, latent_dim), raw image features (B, D))`` of one Stage-1 iteration: fresh
    latents (``sample_latents``) or a random batch of the pool; features from the pool's
    cache or from re-generating the images."""
    if sample_latents is not None:
        w = sample_latents(batch, rng).to(device, torch.float32)
        feats = None
    else:
        idx = torch.randperm(latents.shape[0], generator=rng)[:batch].to(device)
        w, feats = latents[idx], (pool_features[idx] if pool_features is not None else None)
    return w, feats


def _train(learner, latents, pool_features, generate, sample_latents, heldout, rng, cfg, progress, anchor=None):
    """The Stage-1 optimisation loop (Eq. 6) of a ``learned`` / ``adaptive`` learner, in place."""
    encoder, module = learner.encoder, learner.prompt_module
    num_iterations = cfg.stage1_iterations
    available = latents.shape[0] if latents is not None else cfg.stage1_batch_size
    batch = min(cfg.stage1_batch_size, available)
    if batch < 2:
        raise UserError(
            f"Stage 1 needs at least 2 latents per batch for the contrastive loss (got stage1_batch_size="
            f"{cfg.stage1_batch_size}, pool size {available})."
        )
    logit_scale = cfg.logit_scale
    if logit_scale is None:
        logit_scale = float(encoder.clip_model.logit_scale.detach().exp())
    with torch.no_grad():
        target_label_features = (encoder.label_features(learner.target_label, templates=cfg.label_templates)
                                 if anchor is None else anchor.detach().float().to(encoder.device))
        source_label_features = (
            encoder.label_features(learner.source_label, templates=cfg.label_templates)
            if cfg.lambda_source or cfg.domain_regularizer == "direction" else None
        )
    lr = DEFAULT_LEARNING_RATES[learner.scheme] if cfg.stage1_learning_rate is None else float(cfg.stage1_learning_rate)
    module.train().requires_grad_(True)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    bar = tqdm(range(num_iterations), desc=f"Stage 1 ({learner.scheme})", disable=not progress)
    shown = {}
    for iteration in bar:
        w, feats = _next_batch(latents, pool_features, generate, sample_latents, batch, rng, encoder.device)
        if feats is None:  # G_s and E_I are frozen: no gradients needed through them
            with torch.no_grad():
                feats = encoder.encode_images(generate(w))
        terms = stage1_losses(
            module, encoder, w, feats, learner.source_label, target_label_features,
            lambda_domain=cfg.lambda_domain, logit_scale=logit_scale, contrastive_form=cfg.contrastive_form,
            target_label=learner.target_label, source_label_features=source_label_features,
            lambda_source=cfg.lambda_source, domain_regularizer=cfg.domain_regularizer,
        )
        check_finite(terms, "Stage 1", iteration)
        optimizer.zero_grad(set_to_none=True)
        terms["L"].backward()
        optimizer.step()
        record = {name: float(value.detach()) for name, value in terms.items()}
        if heldout is not None and (iteration + 1) % cfg.heldout_every == 0 and iteration + 1 < num_iterations:
            module.eval()
            record["heldout_retrieval"] = prompt_retrieval(learner, *heldout)
            module.train()
        learner.history.append(record)
        shown.update({k: f"{v:.3f}" for k, v in record.items() if k in ("L", "heldout_retrieval")})
        bar.set_postfix(shown)
    bar.close()


__all__ = [
    "PROMPT_SCHEMES",
    "PromptScheme",
    "PromptLearner",
    "learn_prompts",
    "stage1_losses",
    "encode_latent_pool",
    "prompt_retrieval",
]
