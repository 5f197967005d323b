"""The DiffAE backend of ``benchmarks/shapes_worlds.py`` (``--backend diffae``).

The Shapes ``IPLPipeline`` (``--diffae_model``, default the shipped 32 px one) adapted the way
``ipl adapt`` adapts it (:mod:`ipl_diffusion.adaptation.diffae`), with the world's CLIP in place
of the pipeline's own in both stages:

* per seed, the Stage-2 photos and the Stage-1 pool are those ``ipl adapt`` renders for the
  Shapes default (:func:`ipl_diffusion.shapes.shapes_source_images`: ``num_images`` photos of
  the seed's stream, a pool of ``stage1_num_images`` of stream seed + 10_007); the photos are
  DDIM-inverted to ``t0`` with the source UNet once (``encode_sources``) and shared by the
  schemes and worlds of the seed, the pool's ``z_sem`` / CLIP image features (``encode_pool``)
  by the schemes of a world;
* Stage 1: ``run_stage1`` (its held-out retrieval on the pool's last fifth); Stage 2:
  ``DiffAEStage2Trainer`` with the folder's ``adapt_defaults`` (t0, inversion / training /
  inference steps, L1 weight, ...) and the benchmark's lr, iterations (the last milestone),
  batch and seed;
* the ``oracle`` scheme's ΔT_i come from each training photo's *true* factors (rendered photos
  have them; no oracle read), the caption table of ``OracleCaptionPrompts``;
* evaluation: ``--eval_images`` photos of renderer stream 31337 (no run trains on it), inverted
  once; at each milestone the trainer's UNet (``trained_model()``: the trained copy, no EMA)
  decodes them in ``num_inference_steps`` as ``IPLPipeline`` translates. Iteration 0 of every
  curve is the source UNet's round trip (what the unadapted DiffAE outputs); shape / colour
  kept are against the photos' true factors; the feature-spread reference is the photos';
* direction diagnostics: the evaluation photos' ``z_sem`` and true content.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

import shapes_collapse as sc
from ipl_diffusion import ddim
from ipl_diffusion.adaptation.diffae import encode_pool, encode_sources, run_stage1
from ipl_diffusion.adaptation.diffae_trainer import DiffAEStage2Trainer
from ipl_diffusion.adaptation.stage1 import prompt_text_features
from ipl_diffusion.configs import resolve_configs
from ipl_diffusion.shapes import SOURCE_STYLE, ShapesRenderer, shapes_source_images

EVAL_SEED = 31337  # renderer stream of the evaluation photos; runs train on seed, seed + 10_007
# The folders that define the source DiffAE (weights and scheduler configs); not its CLIP
# components, which the benchmark replaces with each world's.
MODEL_FOLDERS = ("source_unet", "semantic_encoder", "latent_net", "scheduler", "latent_scheduler")


@dataclass
class SeedPhotos:
    """One seed's Stage-2 photos ``(N, 3, H, W)``, their true factors, Stage 1's pool of photos
    and (once a trainer needs it) the photos' ``encode_sources`` cache."""

    seed: int
    images: torch.Tensor
    factors: object
    pool: torch.Tensor
    cache: dict | None = None


class DiffAEBackend:
    """The DiffAE backend; the interface is ``shapes_worlds.StyleGAN2Backend``'s."""

    name = "diffae"

    def __init__(self, args, device):
        self.pipe, self.path = sc.load_source_pipeline("diffae", args.diffae_model, device)
        self.device = device
        for module in (self.pipe.semantic_encoder, self.pipe.source_unet):
            module.eval().requires_grad_(False)  # frozen (the trainer trains a copy of the UNet)
        self._photos = None  # the last seed's SeedPhotos: its runs in every world share them
        self._pool = None  # ((seed, image_features), (z_sem, features)): a world's runs of the seed share it

    def model_digests(self, digest):
        """``{name: digest}`` of the folders in ``MODEL_FOLDERS`` and the recorded ``adapt_defaults``."""
        digests = {f"diffae_{name}": digest(Path(self.path) / name) for name in MODEL_FOLDERS}
        digests["diffae_adapt_defaults"] = self.pipe.config.get("adapt_defaults")
        return digests

    def stage2_config(self, args, lr=None, seed=0):
        """``DiffAEStage2Config``: the folder's ``adapt_defaults``, then the benchmark's iterations,
        batch, seed, ``--train_images`` and ``lr`` (None: the shipped one)."""
        options = dict(iterations=args.milestones[-1], batch_size=args.batch_size, seed=seed)
        if lr is not None:
            options["learning_rate"] = lr
        if args.train_images is not None:
            options["num_images"] = args.train_images
        return resolve_configs("diffae", self.pipe.config.get("adapt_defaults"), options)[1]

    def content_reader(self, oracle):
        return None  # rendered photos: the oracle scheme is always given their true content

    # -- evaluation -----------------------------------------------------------------------
    def evaluation_set(self, oracle, args):
        """The source UNet's round trip of the evaluation photos, and ``ev`` (``cache``,
        ``factors``, ``photos``, ``spread``)."""
        photos, factors = ShapesRenderer(self.pipe.image_size).sample(args.eval_images, seed=EVAL_SEED, style=SOURCE_STYLE)
        config = self.stage2_config(args)
        cache = self.encode(photos, config)
        spread = sc.mean_pairwise_distance(oracle.predict(photos)["features"])
        ev = dict(cache=cache, factors=factors, photos=photos, spread=spread)
        return self.decode(self.pipe.source_unet, cache, config), ev

    def diagnostics_set(self, oracle, args, ev):
        return dict(w=ev["cache"]["z_sem"], content=(ev["factors"].shape, ev["factors"].color))

    def source_label(self, args):
        return "source round trip", "the source UNet's DDIM round trip of held-out photos"

    def diagnostics_label(self, args):
        return f"the {args.eval_images} evaluation photos' z_sem"

    def render(self, trainer, ev, args):
        """The trained UNet's decoding of the evaluation photos now."""
        return self.decode(trainer.trained_model(), ev["cache"], trainer.config)

    def encode(self, images, config):
        pipe = self.pipe
        return encode_sources(pipe.semantic_encoder, pipe.source_unet, pipe.scheduler, images, config.t0,
                              config.num_inversion_steps, progress=False)

    @torch.no_grad()
    def decode(self, unet, cache, config, chunk=16):
        """``x_{t0} -> x0`` of every cached image with ``unet`` (``num_inference_steps``), CPU, clamped to [-1, 1]."""
        parts = []
        for i in range(0, cache["x_t0"].shape[0], chunk):
            x_t0, z_sem = cache["x_t0"][i : i + chunk].to(self.device), cache["z_sem"][i : i + chunk].to(self.device)
            parts.append(ddim.decode_from_t0(unet, x_t0, z_sem, self.pipe.scheduler, config.t0, config.num_inference_steps).float())
        return torch.cat(parts).clamp(-1, 1).cpu()

    # -- one run -------------------------------------------------------------------------
    def seed_photos(self, seed, args):
        """The seed's :class:`SeedPhotos`, rendered as ``ipl adapt`` does (kept for the next run of the seed)."""
        if self._photos is None or self._photos.seed != seed:
            count = self.stage2_config(args).num_images
            inputs = shapes_source_images(self.pipe, count, seed, args.stage1_images, num_validation_images=1)
            images, factors = ShapesRenderer(self.pipe.image_size).sample(count, seed=seed, style=SOURCE_STYLE)
            if not torch.equal(images, inputs["images"]):  # the factors must be those of ipl adapt's photos
                raise RuntimeError("shapes_source_images no longer renders the seed's photos with ShapesRenderer.sample")
            self._photos = SeedPhotos(seed, images, factors, inputs["stage1_images"])
        return self._photos

    def seed_cache(self, seed, args):
        """The seed's photos encoded once (``encode_sources``: z_sem, x_{t0}), Stage 2's cache."""
        photos = self.seed_photos(seed, args)
        if photos.cache is None:
            photos.cache = self.encode(photos.images, self.stage2_config(args))
        return photos.cache

    def stage1(self, encoder, image_features, options, seed, args):
        key = (seed, image_features)
        if self._pool is None or self._pool[0] != key:
            pool = self.seed_photos(seed, args).pool
            self._pool = (key, encode_pool(self.pipe.semantic_encoder, image_features, pool, self.device))
        z_sem, features = self._pool[1]
        return run_stage1(encoder, z_sem, features, "photo", args.target, options, seed, progress=False)

    def stage2_prompts(self, learner, scheme, seed, args):
        """``(source (N, D), target (N, D))`` prompt features of the seed's N photos (their
        ``z_sem``; the oracle scheme: their true captions), what ``DiffAEStage2Trainer`` takes."""
        photos = self.seed_photos(seed, args)
        z_sem = self.seed_cache(seed, args)["z_sem"].to(self.device)
        if scheme == "oracle":
            content = (photos.factors.shape, photos.factors.color)
            return tuple(learner.text_features(z_sem, label, content) for label in ("photo", args.target))
        return prompt_text_features(learner, z_sem, "photo", args.target)

    def trainer(self, prompts, encoder, image_features, seed, lr, args):
        config = self.stage2_config(args, lr, seed)
        identity = self.pipe.semantic_encoder if config.id_loss_weight > 0 else None
        return DiffAEStage2Trainer(self.pipe.source_unet, self.pipe.scheduler, self.seed_cache(seed, args), *prompts,
                                   image_features, config, identity_features=identity)
