"""The embedded Shapes models' recommended adaptation settings and source images.

The two dicts are recorded in the shipped folders (``model_index.json`` ``adapt_defaults``, a
test keeps them equal), so ``pipe.adapt("sketch")`` and ``ipl adapt --target sketch`` use
them; their keys are fields of :class:`ipl_diffusion.configs.Stage1Config` and the backend's
Stage-2 config.
"""

# IPLPipeline.adapt settings for the embedded Shapes DiffAE (32x32, 1.5 M-parameter UNet), sized
# so that `ipl adapt --target sketch` runs in a few minutes on 2 CPU cores, and recorded in the
# shipped folder (ipl_diffusion/shapes_models/diffae-ipl/model_index.json, a test keeps the two
# equal). Stage 1 is the paper's (300 iterations of 32) on a pool of 2048 rendered photos, so
# that the mapper generalises (held-out prompt retrieval 0.32, chance 0.03). The Stage-2
# learning rate was chosen on the NADA baseline (manual prompts, "sketch", seed 0, 32 held-out
# photos, `python benchmarks/main_job.py --backends diffae --targets sketch --extra --scheme
# manual --lr LR`), never on IPL, after the first-step fix (ΔI from x0, gradient clipping):
# the smallest lr at which NADA reaches >= 90% sketch. lr 5e-5 / 1e-4 only pale the
# background (oracle 47% / 72% sketch, solid objects by eye); 1.5e-4 draws hollow outlines
# (100%, shape kept 56%, colour kept 88%); 2e-4 turns most objects into rings (97%, 50%, 75%).
# 64 Stage-2 photos instead of 16 gave twisted, solid shapes (91%, 66%, 100%), t0 400 solid
# pinched shapes (81%), L1 weight 1.0 fewer outlines (53%).
SHAPES_ADAPT_DEFAULTS = dict(
    num_images=16,
    stage1_num_images=2048,
    stage1_iterations=300,
    stage1_batch_size=32,
    t0=500,
    num_inversion_steps=20,
    num_train_steps=4,
    num_inference_steps=20,
    learning_rate=1.5e-4,
    iterations=30,
    batch_size=4,
    l1_loss_weight=0.5,
)

# StyleGANIPLPipeline.adapt defaults for the embedded Shapes StyleGAN2 (32x32, 0.4 M-parameter
# generator), recorded in ipl_diffusion/shapes_models/stylegan2/model_index.json: IPL's recipe
# (Stage 1: 300 iterations of 32 fresh samples; Stage 2: 300 iterations, Adam betas
# (0, 0.99^0.8), EMA 0.99, NADA's adaptive layer choice) with batch 4. After 300 iterations the
# evaluated g_ema holds 0.99^300 = 5% of the initial weights (it held 55% with the old 60
# iterations). The lr was chosen on the NADA baseline ("sketch", seed 0, 32 held-out z,
# `python benchmarks/main_job.py --backends stylegan2 --targets sketch --extra --scheme manual
# --lr LR`), never on IPL, as the smallest lr at which NADA reaches >= 90% sketch: 0.0005 gives
# 75% (shape kept 97%), 0.001 100% (56%), 0.002 100% (31%). By eye even 0.001 only whitens the
# background and rim-lights the objects: this generator does not draw outlines.
SHAPES_GAN_ADAPT_DEFAULTS = dict(
    stage1_iterations=300,
    stage1_batch_size=32,
    iterations=300,
    batch_size=4,
    learning_rate=0.001,
)


def shapes_source_images(pipe, num_images, seed, stage1_num_images=None):
    """The embedded Shapes DiffAE's inputs: rendered photos (its latent net, trained for
    minutes, samples z_sem less faithfully than the renderer draws) -- the Stage-2 images, a
    large Stage-1 pool (so that the mapper generalises) and 8 photos for the before/after
    grid that neither stage sees. Three disjoint seed streams of the run's seed; a count left
    None is the folder's recorded adapt_defaults."""
    from ipl_diffusion.shapes import source_images

    defaults = pipe.config.get("adapt_defaults") or {}
    size = pipe.image_size
    return {
        "images": source_images(num_images or defaults.get("num_images", 16), seed=seed, resolution=size),
        "stage1_images": source_images(
            stage1_num_images or defaults.get("stage1_num_images", 2048), seed=seed + 10_007, resolution=size
        ),
        "validation_images": source_images(8, seed=seed + 20_011, resolution=size),
    }
