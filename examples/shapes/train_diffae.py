#!/usr/bin/env python
"""Train the Shapes DiffAE (semantic encoder + conditional UNet, then the latent DDIM) on "photo".

This is the source generator of the embedded default: a diffusion autoencoder built from the
project's own DiffAE classes (:class:`~ipl_diffusion.models.SemanticEncoder`,
:class:`~ipl_diffusion.models.DiffAEUNetModel`, :class:`~ipl_diffusion.models.LatentNetModel`)
with a small config, trained on the Shapes renderer's "photo" style only (the source domain).

Two phases, as upstream DiffAE trains them:

1. ``autoencoder``: encoder and UNet jointly with the DDPM loss on ``x_t`` (linear betas
   1e-4..0.02, T = 1000; upstream ``autoenc_base``), Adam, gradient clipping 1, EMA of both
   networks (inference uses EMA). The UNet's target is ``--prediction_type``:

   * ``epsilon`` -- upstream DiffAE's ``|| eps - eps_theta(x_t, t, Enc(x_0)) ||^2``;
   * ``v_prediction`` (default) -- ``v = sqrt(a) eps - sqrt(1 - a) x_0`` (Salimans & Ho 2022),
     diffusers' ``get_velocity``. Why: the x0 an eps model implies is
     ``(x_t - sqrt(1 - a) eps) / sqrt(a)``, so at high noise (``a`` ~ 1e-3 at t = 800) its eps
     error is amplified some 30 times and the eps loss hardly rewards using ``z_sem`` there.
     An eps-trained Shapes DiffAE after 145 CPU minutes reconstructed well by DDIM inversion
     (28 dB) but its x0 predictions at t >= 800 were worse than the mean image (MSE 0.5-1.1 vs
     0.09), and decoding true ``z_sem`` from fresh noise gave saturated, noisy images the
     oracle read as photos 19% of the time. Eight minutes of v-prediction fine-tuning from it
     brought that x0 error to 0.05 and the photo rate to 100%. The scheduler saved with the
     model records the choice and :mod:`ipl_diffusion.ddim` converts v to eps.

   ``--init_from`` starts a fresh run from a trained folder's encoder and UNet (how the shipped
   v-prediction model was made from the eps-trained one).
2. ``latent``: encode fresh photo images with the EMA encoder, set ``conds_mean/std`` and train
   the latent DDIM on z-normalised ``z_sem`` (upstream: constant beta 0.008, L1 loss, eps
   prediction, AdamW wd 0.01).

At the end the EMA weights are written with ``save_pretrained`` to
``<output_dir>/{semantic_encoder,unet,latent_net,scheduler,latent_scheduler}`` -- a
``DiffAEPipeline`` folder (``model_index.json``) -- together with
``training_record.json`` (seed, config, wall time per phase, reconstruction error of
DDIM inversion -> decoding, and an oracle's reading of samples when the oracle exists) and
sample grids. Checkpoints go to ``--work_dir`` (safetensors; ``--resume_from_checkpoint latest``
continues a killed run).

Example (the shipped model: eps training, then v-prediction fine-tuning; then its assembly
with the Shapes CLIP; wall times and steps are in the shipped ``training_record.json``)::

    EPS="--prediction_type epsilon --phase autoencoder --work_dir runs/shapes_diffae_eps --output_dir runs/shapes_diffae_eps_out"
    python examples/shapes/train_diffae.py $EPS --batch_size 16 --max_minutes 70
    python examples/shapes/train_diffae.py $EPS --batch_size 32 --max_minutes 75   # resumes
    python examples/shapes/train_diffae.py --init_from runs/shapes_diffae_eps_out --learning_rate 2e-4 \
        --batch_size 32 --max_minutes 60 --latent_minutes 5
    python examples/assemble_shapes_ipl.py     # -> ipl_diffusion/shapes_models/diffae-ipl
"""

import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ipl_diffusion.checkpointing import ResumableRun, load_checkpoint, resolve_checkpoint
from ipl_diffusion.cli import run_script
from ipl_diffusion.cli.parser import IplArgumentParser
from ipl_diffusion.cli.argtypes import nonempty_text, nonnegative_int, positive_float, positive_int, positive_int_list
from ipl_diffusion.ddim import ddim_decode, ddim_invert
from ipl_diffusion.errors import NonFiniteLossError, UserError, UserFileNotFoundError
from ipl_diffusion.grids import labelled_grid
from ipl_diffusion.models import DiffAEUNetModel, LatentNetModel, SemanticEncoder
from ipl_diffusion.outputs import check_writable, output_lock
from ipl_diffusion.shapes.renderer import SOURCE_STYLE, ShapesRenderer, sample_factors
# Upstream DiffAE's two diffusions: images (linear betas, clipped x0), latents (constant beta).
from ipl_diffusion.pipelines.pipeline_diffae import DiffAEPipeline, default_latent_scheduler, diffae_scheduler


def parse_args(argv=None):
    p = IplArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="runs/shapes_diffae_out", help="trained DiffAEPipeline folder (then examples/assemble_shapes_ipl.py)")
    p.add_argument("--work_dir", default="runs/shapes_diffae")
    p.add_argument("--resolution", type=positive_int, default=32)
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--max_steps", type=nonnegative_int, default=20000, help="autoencoder steps (upper bound)")
    p.add_argument("--max_minutes", type=positive_float, default=None, help="wall time of the autoencoder phase")
    p.add_argument("--learning_rate", type=positive_float, default=4e-4)
    p.add_argument(
        "--prediction_type",
        choices=["epsilon", "v_prediction"],
        default="v_prediction",
        help="UNet target (recorded in the scheduler config); see the module docstring",
    )
    p.add_argument(
        "--init_from",
        type=nonempty_text,
        default=None,
        help="DiffAEPipeline folder whose semantic_encoder/unet start a fresh run (warm start); ignored on resume",
    )
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--model_channels", type=positive_int, default=32)
    p.add_argument("--channel_mult", type=positive_int_list, default="1,2,2")
    p.add_argument("--encoder_channel_mult", type=positive_int_list, default="1,2,4,4")
    p.add_argument("--z_sem_channels", type=positive_int, default=128)
    p.add_argument("--latent_hidden", type=positive_int, default=256, help="hidden width of the latent DDIM MLP")
    p.add_argument("--latent_layers", type=positive_int, default=6)
    p.add_argument("--latent_steps", type=nonnegative_int, default=4000)
    p.add_argument("--latent_minutes", type=positive_float, default=None)
    p.add_argument("--latent_batch_size", type=positive_int, default=256)
    p.add_argument("--latent_pool", type=positive_int, default=12000, help="photo images encoded for the latent DDIM")
    p.add_argument("--checkpointing_steps", type=positive_int, default=200)
    p.add_argument(
        "--phase",
        choices=["all", "autoencoder", "latent"],
        default="all",
        help="'latent' trains only the latent DDIM on the newest autoencoder checkpoint in --work_dir",
    )
    p.add_argument("--resume_from_checkpoint", default="latest", help="'latest', a checkpoint folder, or 'none'")
    p.add_argument("--eval_steps", type=positive_int, default=20, help="DDIM steps for the reconstruction/sample checks")
    p.add_argument("--oracle", default="ipl_diffusion/shapes_models/oracle", help="oracle folder for the sample check")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    missing = [sub for sub in ("semantic_encoder", "unet") if args.init_from and not (Path(args.init_from) / sub / "config.json").is_file()]
    if missing:  # before any folder is made or model built
        p.error(f"--init_from {args.init_from}: no DiffAEPipeline folder there ({'/, '.join(missing)}/ missing)")
    return args


def ints(text):
    return tuple(int(v) for v in str(text).split(","))


def build_models(args):
    encoder = SemanticEncoder(
        sample_size=args.resolution,
        model_channels=args.model_channels,
        channel_mult=ints(args.encoder_channel_mult),
        num_res_blocks=1,
        attention_resolutions=(),
        z_sem_channels=args.z_sem_channels,
    )
    unet = DiffAEUNetModel(
        sample_size=args.resolution,
        model_channels=args.model_channels,
        channel_mult=ints(args.channel_mult),
        num_res_blocks=1,
        # Attention only at the lowest resolution: at 16x16 it costs more than the convolutions.
        attention_resolutions=(args.resolution // 2 ** (len(ints(args.channel_mult)) - 1),),
        dropout=0.0,
        embed_channels=4 * args.model_channels,
        z_sem_channels=args.z_sem_channels,
    )
    latent_net = LatentNetModel(
        num_channels=args.z_sem_channels,
        num_hid_channels=args.latent_hidden,
        num_layers=args.latent_layers,
        skip_layers=tuple(range(1, args.latent_layers - 1)),
    )
    return encoder, unet, latent_net


@torch.no_grad()
def ema_update(ema_model, model, decay):
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)


def warm_start(folder, models):
    """Copy a trained DiffAEPipeline folder's encoder and UNet into the models and their EMAs.

    Raises UserError when the folder's weights do not fit this run's config (missing, unexpected
    or mis-shaped keys), rather than training a half-initialised model.
    """
    folder = Path(folder)
    pairs = (("semantic_encoder", SemanticEncoder, ("encoder", "ema_encoder")), ("unet", DiffAEUNetModel, ("unet", "ema_unet")))
    for sub, cls, names in pairs:
        trained = cls.from_pretrained(folder / sub).state_dict()
        for name in names:
            mine = models[name].state_dict()
            differ = sorted(set(mine) ^ set(trained)) + [k for k in mine if k in trained and mine[k].shape != trained[k].shape]
            if differ:
                raise UserError(f"--init_from {folder}/{sub} does not fit this run's {name} ({len(differ)} keys missing, "
                                f"extra or of another shape, e.g. {differ[0]}); give the model sizes it was trained with")
            models[name].load_state_dict(trained)
    print(f"initialised encoder and UNet from {folder}")


def train_autoencoder(args, encoder, unet, ema_encoder, ema_unet, work, renderer):
    params = list(encoder.parameters()) + list(unet.parameters())
    optimizer = torch.optim.Adam(params, lr=args.learning_rate)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    models = {"encoder": encoder, "unet": unet, "ema_encoder": ema_encoder, "ema_unet": ema_unet}
    run = ResumableRun(work, models, {"adam": optimizer}, {"data": data_gen}, vars(args), args.resume_from_checkpoint,
                       name="autoencoder")
    if run.resumed:
        trained_as = run.saved_config.get("prediction_type", "epsilon")  # checkpoints from before the option: eps
        if trained_as != args.prediction_type:
            raise UserError(f"{run.resumed_from} was trained with --prediction_type {trained_as}; resume it with that, or start a new --work_dir")
    elif args.init_from:
        warm_start(args.init_from, models)
    encoder.train()
    unet.train()
    last_loss = float("nan")
    while run.running(args.max_steps, args.max_minutes):
        step = run.step
        factors = sample_factors(args.batch_size, generator=data_gen, style=SOURCE_STYLE)
        x0 = renderer.render(factors, generator=data_gen)
        noise = torch.randn(x0.shape, generator=data_gen)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=data_gen)
        x_t = noise_scheduler.add_noise(x0, noise, t)
        target = noise if args.prediction_type == "epsilon" else noise_scheduler.get_velocity(x0, noise, t)
        loss = F.mse_loss(unet(x_t, t, encoder(x0)).sample, target)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"non-finite DiffAE loss at step {step}; lower --learning_rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step = run.step = step + 1
        # EMA warm-up (as in diffusers' EMAModel): short runs must not average in random init.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_encoder, encoder, decay)
        ema_update(ema_unet, unet, decay)
        last_loss = loss.item()
        if step % 25 == 0:
            print(dict(phase="autoencoder", step=step, loss=round(last_loss, 5), minutes=round(run.minutes(), 2)), flush=True)
        if step % args.checkpointing_steps == 0:
            run.save()
    return run.step, run.save(), last_loss


def train_latent(args, ema_encoder, latent_net, work, renderer):
    """Phase 2: the latent DDIM on z-normalised z_sem of fresh photo images (EMA encoder, frozen)."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        codes = []
        for i in range(0, args.latent_pool, 500):
            x0, _ = renderer.sample(min(500, args.latent_pool - i), seed=args.seed * 7919 + 1000 + i, style=SOURCE_STYLE)
            codes.append(ema_encoder(x0))
        codes = torch.cat(codes)
    latent_net.set_statistics(codes)
    z = latent_net.normalize(codes)
    optimizer = torch.optim.AdamW(latent_net.parameters(), lr=1e-3, weight_decay=0.01)
    betas = torch.full((1000,), 0.008)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    run = ResumableRun(work / "latent", {"latent_net": latent_net}, {"adamw": optimizer}, {"data": gen}, vars(args),
                       args.resume_from_checkpoint, name="latent DDIM")
    latent_net.train()
    while run.running(args.latent_steps, args.latent_minutes):
        step = run.step
        idx = torch.randint(0, z.shape[0], (args.latent_batch_size,), generator=gen)
        z0 = z[idx]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (z0.shape[0],), generator=gen)
        a = alphas_cumprod[t].unsqueeze(1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
        lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / args.latent_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.l1_loss(latent_net(z_t, t), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step = run.step = step + 1
        if step % 100 == 0:
            print(dict(phase="latent", step=step, loss=round(loss.item(), 5), minutes=round(run.minutes(), 2)), flush=True)
        if step % 500 == 0:
            run.save()
    elapsed = run.save()
    latent_net.eval()
    return run.step, elapsed, loss.item() if run.step else float("nan")


@torch.no_grad()
def sample_images(unet, latent_net, scheduler, n, steps, latent_steps, seed):
    """Unconditional samples: z_sem from the latent DDIM, x_T ~ N(0, I), DDIM-decoded."""
    g = torch.Generator().manual_seed(seed)
    z_T = torch.randn(n, latent_net.config.num_channels, generator=g)
    z_sem = latent_net.denormalize(ddim_decode(latent_net, z_T, None, default_latent_scheduler(), latent_steps))
    res = unet.config.sample_size
    x_T = torch.randn(n, 3, res, res, generator=g)
    return ddim_decode(unet, x_T, z_sem, scheduler, steps)


@torch.no_grad()
def evaluate(args, encoder, unet, latent_net, renderer, out_dir):
    """Reconstruction error of encode -> DDIM-invert -> decode, and an oracle's reading of samples."""
    x0, factors = renderer.sample(64, seed=424242, style=SOURCE_STYLE)
    z_sem = encoder(x0)
    scheduler = diffae_scheduler(args.prediction_type)
    x_T = ddim_invert(unet, x0, z_sem, scheduler, args.eval_steps)
    recon = ddim_decode(unet, x_T, z_sem, scheduler, args.eval_steps)
    # The semantic part alone: decode the same z_sem from random noise (DiffAE's "stochastic" variation).
    x_rand = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    semantic = ddim_decode(unet, x_rand, z_sem, scheduler, args.eval_steps)
    metrics = {
        "ddim_steps": args.eval_steps,
        "reconstruction_mse": F.mse_loss(recon, x0).item(),
        "reconstruction_psnr_db": (10 * torch.log10(4 / F.mse_loss(recon, x0))).item(),
        "semantic_decode_mse": F.mse_loss(semantic, x0).item(),
    }
    samples = None
    if latent_net is not None:
        samples = sample_images(unet, latent_net, scheduler, 64, args.eval_steps, 50, seed=99)
    oracle_dir = Path(args.oracle)
    if (oracle_dir / "config.json").is_file():
        from ipl_diffusion.shapes.oracle import ShapesOracle

        oracle = ShapesOracle.from_pretrained(oracle_dir).eval()
        truth = oracle.predict(x0)
        for name, images in (("reconstruction", recon), ("semantic_decode", semantic)):
            pred = oracle.predict(images)
            metrics[f"{name}_oracle_agreement"] = {
                k: (pred[k] == getattr(factors, k)).float().mean().item() for k in ("style", "shape", "color")
            }
            metrics[f"{name}_oracle_agreement"]["position_err_px"] = (
                (pred["position"] - truth["position"]).norm(dim=1).mean().item() * args.resolution
            )
        if samples is not None:
            pred = oracle.predict(samples)
            conf = torch.stack([pred[f"{k}_probs"].max(1).values for k in ("style", "shape", "color")]).mean(0)
            metrics["samples_oracle"] = {
                "photo_fraction": (pred["style"] == 0).float().mean().item(),
                "mean_confidence": conf.mean().item(),
                "distinct_shapes": int(pred["shape"].unique().numel()),
                "distinct_colors": int(pred["color"].unique().numel()),
            }
    rows = [x0[:16], recon[:16], semantic[:16]]
    if samples is not None:
        rows += [samples[:16], samples[16:32]]
    labelled_grid(rows, min_tile=64, margin=0).save(out_dir / "samples.png")  # tiles upscaled (nearest) to 64 px
    return metrics


def main(argv=None):
    args = parse_args(argv)
    check_writable(args.output_dir, "--output_dir")  # now, not after training (nothing is created)
    # One run per --work_dir: two would rotate each other's checkpoints away.
    with output_lock(args.work_dir, "--work_dir"):
        return train(args)


def train(args):
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.output_dir)  # made by save_pretrained at the end: a refused run leaves none
    renderer = ShapesRenderer(args.resolution)
    encoder, unet, latent_net = build_models(args)
    ema_encoder, ema_unet = copy.deepcopy(encoder).eval(), copy.deepcopy(unet).eval()
    for p in list(ema_encoder.parameters()) + list(ema_unet.parameters()):
        p.requires_grad_(False)
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in (("semantic_encoder", encoder), ("unet", unet), ("latent_net", latent_net))}
    print("parameters:", counts)
    record = dict(
        task="shapes_diffae",
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        config=vars(args),
        parameters=counts,
        torch_threads=torch.get_num_threads(),
    )

    if args.phase in ("all", "autoencoder"):
        steps, seconds, loss = train_autoencoder(args, encoder, unet, ema_encoder, ema_unet, work, renderer)
        record["autoencoder"] = dict(steps=steps, wall_seconds=seconds, last_loss=loss)
    else:
        resume = resolve_checkpoint(work, "latest")
        if resume is None:
            raise UserFileNotFoundError(f"--phase latent needs an autoencoder checkpoint in {work}")
        steps, saved = load_checkpoint(resume, {"encoder": encoder, "unet": unet, "ema_encoder": ema_encoder, "ema_unet": ema_unet}, restore_rng=False)
        # The saved model predicts what its autoencoder run trained it to, whatever this command says.
        args.prediction_type = saved.get("prediction_type", "epsilon")
        record["autoencoder"] = dict(
            steps=steps,
            wall_seconds=float(saved.get("elapsed_seconds", 0.0)),
            config={k: v for k, v in saved.items() if k != "elapsed_seconds"},
        )
    init_from = record["autoencoder"].get("config", vars(args)).get("init_from")
    if init_from and (Path(init_from) / "training_record.json").is_file():
        # A warm-started model's history: the record of the run it started from.
        record["warm_start"] = dict(init_from=init_from, record=json.loads((Path(init_from) / "training_record.json").read_text()))
    if args.phase in ("all", "latent"):
        steps, seconds, loss = train_latent(args, ema_encoder, latent_net, work, renderer)
        record["latent_net"] = dict(steps=steps, wall_seconds=seconds, last_loss=loss)
    else:
        latent_net = None
    # The parts form a DiffAEPipeline folder (model_index.json + one sub-folder per model), so
    # DiffAEPipeline.from_pretrained / IPLPipeline.from_components read them directly.
    DiffAEPipeline(
        semantic_encoder=ema_encoder,
        unet=ema_unet,
        scheduler=diffae_scheduler(args.prediction_type),
        latent_net=latent_net,
        latent_scheduler=default_latent_scheduler() if latent_net is not None else None,
    ).save_pretrained(out)
    record["evaluation"] = evaluate(args, ema_encoder, ema_unet, latent_net, renderer, out)
    print("evaluation:", json.dumps(record["evaluation"], indent=1))
    (out / "training_record.json").write_text(json.dumps(record, indent=1))
    (work / "training_record.json").write_text(json.dumps(record, indent=1))
    print(f"saved to {out}")


if __name__ == "__main__":
    run_script(main)  # a UserError: one line, exit status 2
