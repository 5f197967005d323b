#!/usr/bin/env python
"""Train a Shapes StyleGAN2 (the GAN-IPL source generator) on the "photo" style.

Uses the project's own rosinality-layout :class:`~ipl_diffusion.models.StyleGAN2Generator` and
:class:`~ipl_diffusion.models.stylegan2.StyleGAN2Discriminator` with a small config (size 32,
``style_dim`` 128, ``n_mlp`` 4, ``channel_max`` 64). Three phases (``--phase``):

``gan`` (default)
    StyleGAN2's objective (Karras et al. 2020, as trained by rosinality's ``train.py``):
    non-saturating logistic loss, lazy R1 penalty on real images every ``--d_reg_every`` steps
    (with the Adam hyper-parameters rescaled for lazy regularisation, StyleGAN2 Appendix B),
    style mixing, and an EMA generator ``g_ema`` (half-life of 10k images). Path-length
    regularisation is left out: it serves the smoothness of W for projection at high
    resolution and costs a second generator pass; the Shapes generator is only a source model
    for adaptation. ``--init_from`` starts it from a trained generator folder.
``autoencoder``
    A reconstruction pre-training of the synthesis network, for machines without a GPU: an
    encoder (the DiffAE semantic encoder's small config) maps each photo to one ``w`` and the
    synthesis network must redraw it (MSE plus a gradient difference loss on edges). Why: on a
    2-core CPU the adversarial phase sees some 2k images a minute; after 5000-7500 steps
    (160-240k images, several recipes: longer, no style mixing, 20x R1) its samples had the
    data's colours, shading and placement but were still round blobs. Reconstruction gives
    the synthesis network a direct per-pixel signal for every image instead.
``mapping``
    With the synthesis network and encoder of the autoencoder phase frozen, the mapping network
    ``z -> w`` is trained adversarially in W (a small MLP critic, non-saturating loss, R1)
    to produce the distribution of the encoder's codes of photos, so that ``G(z)`` for
    ``z ~ N(0, I)`` draws photos again. The result is an ordinary StyleGAN2 generator.

Images are rendered on the fly (``photo`` only). The ``gan`` and ``mapping`` phases write the
generator (``g_ema``; the mapping phase's generator) with ``save_pretrained`` (safetensors) plus
``training_record.json`` and a sample grid; when the Shapes oracle exists its reading of 256
samples (photo fraction, shape / colour entropy) is recorded. Checkpoints (models, optimisers,
RNG) go to ``--work_dir`` (``autoencoder/`` and ``mapping/`` below it for those phases);
``--resume_from_checkpoint latest`` continues a killed run.

Example (the shipped model; wall times and results are in its ``training_record.json``,
which holds the records of all three runs)::

    python examples/shapes/train_stylegan2.py --max_minutes 70                   # gan: 3341 steps, blobs
    AE="--work_dir runs/shapes_stylegan2_ae --output_dir runs/shapes_stylegan2_ae_out"
    python examples/shapes/train_stylegan2.py $AE --phase autoencoder --max_minutes 60 \
        --init_from runs/shapes_stylegan2_out               # 11578 steps in 60 minutes (1-2 threads)
    python examples/shapes/train_stylegan2.py $AE --phase mapping                # 12 minutes
    python examples/assemble_shapes_ipl.py --backend stylegan2 --trained runs/shapes_stylegan2_ae_out

A ``gan`` phase after the mapping phase (``--init_from`` its output, a fresh discriminator) was
tried for 400 steps on an earlier autoencoder checkpoint (step 7000): the oracle's shape
entropy of the samples moved from 1.57 to 1.63 nats and they looked the same, so the shipped
model stops after the mapping phase.
"""

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ipl_diffusion.checkpointing import ResumableRun, load_checkpoint, resolve_checkpoint
from ipl_diffusion.cli import run_script
from ipl_diffusion.cli.parser import IplArgumentParser
from ipl_diffusion.cli.argtypes import nonempty_text, nonnegative_int, positive_float, positive_int
from ipl_diffusion.grids import labelled_grid
from ipl_diffusion.models.semantic_encoder import SemanticEncoder
from ipl_diffusion.models.stylegan2 import EqualLinear, StyleGAN2Discriminator, StyleGAN2Generator
from ipl_diffusion.outputs import output_lock
from ipl_diffusion.shapes.renderer import COLORS, SHAPES, SOURCE_STYLE, STYLES, ShapesRenderer, sample_factors


def parse_args(argv=None):
    p = IplArgumentParser(
        description=__doc__.split("\n\n")[0]
        + " The shipped model ran the phases gan, then autoencoder (--init_from the gan output), then mapping;"
        " on a CPU the gan phase alone draws blobs. The module docstring has the commands and the reasons.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output_dir", default="runs/shapes_stylegan2_out", help="trained generator folder (then examples/assemble_shapes_ipl.py --backend stylegan2)")
    p.add_argument("--work_dir", default="runs/shapes_stylegan2", help="checkpoints (autoencoder/ and mapping/ below it for those phases)")
    p.add_argument("--resolution", type=positive_int, default=32, help="image size")
    p.add_argument("--style_dim", type=positive_int, default=128, help="width of z and w")
    p.add_argument("--n_mlp", type=positive_int, default=4, help="mapping network depth")
    p.add_argument("--channel_max", type=positive_int, default=64, help="feature width at every scale")
    p.add_argument("--batch_size", type=positive_int, default=32, help="images per step (gan, autoencoder)")
    p.add_argument("--max_steps", type=nonnegative_int, default=20000, help="steps of the gan / autoencoder phase, counting resumed ones")
    p.add_argument("--max_minutes", type=positive_float, default=None, help="wall-time bound of this run")
    p.add_argument("--learning_rate", type=positive_float, default=0.002, help="Adam learning rate (all phases)")
    p.add_argument("--r1", type=float, default=0.05, help="R1 weight gamma (small images need a small gamma)")
    p.add_argument("--d_reg_every", type=positive_int, default=16, help="gan phase: R1 every this many steps (lazy regularisation)")
    p.add_argument("--mixing", type=float, default=0.9, help="style-mixing probability")
    p.add_argument("--ema_kimg", type=float, default=10.0, help="EMA half-life in thousands of images")
    p.add_argument("--checkpointing_steps", type=positive_int, default=500, help="checkpoint every this many steps (x10 in the mapping phase)")
    p.add_argument("--oracle", default="ipl_diffusion/shapes_models/oracle", help="Shapes oracle folder that reads the final samples (evaluation only; skipped if absent)")
    p.add_argument("--resume_from_checkpoint", default="latest", help="'latest', a checkpoint folder, or 'none'")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data and latents")
    p.add_argument(
        "--phase",
        choices=("gan", "autoencoder", "mapping"),
        default="gan",
        help="gan: StyleGAN2's adversarial training; autoencoder: encoder + synthesis network trained to "
        "reconstruct photos; mapping: then the mapping network trained adversarially in W against the encoder's codes",
    )
    p.add_argument("--init_from", type=nonempty_text, default=None, help="a trained generator folder (save_pretrained) to start the autoencoder or gan phase from")
    p.add_argument("--encoder_channels", type=positive_int, default=32, help="base width of the autoencoder phase's encoder")
    p.add_argument("--edge_weight", type=float, default=1.0, help="weight of the autoencoder phase's gradient difference loss")
    p.add_argument("--mapping_codes", type=positive_int, default=32768, help="photos encoded once as the mapping phase's real codes")
    p.add_argument("--mapping_kimg", type=positive_float, default=15000.0, help="thousands of latent codes the mapping phase trains on")
    p.add_argument("--mapping_batch_size", type=positive_int, default=256, help="latent codes per mapping-phase step")
    return p.parse_args(argv)


def mixed_latents(batch, style_dim, prob, generator):
    """One z per image, or (with probability ``prob``) two for style mixing."""
    if torch.rand((), generator=generator) < prob:
        return [torch.randn(batch, style_dim, generator=generator) for _ in range(2)]
    return [torch.randn(batch, style_dim, generator=generator)]


@torch.no_grad()
def accumulate(ema, model, decay):
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def d_r1_penalty(discriminator, real):
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real).sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


@torch.no_grad()
def oracle_report(g_ema, oracle_dir, n=256, seed=123):
    from ipl_diffusion.shapes.oracle import ShapesOracle, label_entropy

    oracle = ShapesOracle.from_pretrained(oracle_dir).eval()
    g = torch.Generator().manual_seed(seed)
    images = g_ema([torch.randn(n, g_ema.config.style_dim, generator=g)], randomize_noise=False)[0].clamp(-1, 1)
    pred = oracle.predict(images)
    return dict(
        photo_fraction=float((pred["style"] == STYLES.index(SOURCE_STYLE)).float().mean()),
        shape_entropy=label_entropy(pred["shape"], len(SHAPES)),
        color_entropy=label_entropy(pred["color"], len(COLORS)),
        max_entropy_shape=math.log(len(SHAPES)),
        max_entropy_color=math.log(len(COLORS)),
    )


def grid(rows):
    """rows: list of (N, 3, H, W) tensors in [-1, 1] -> one PIL image (2x nearest), a row per tensor."""
    return labelled_grid(rows, min_tile=2 * rows[0].shape[-1], margin=0)


def phase_run(args, work, models, optimizers, data_gen, name):
    """The phase's :class:`~ipl_diffusion.checkpointing.ResumableRun` in ``work``: resumed from
    ``--resume_from_checkpoint`` (``latest`` by default; ``none`` starts afresh) with its
    models, optimisers, data RNG and wall time; ``save()`` keeps the newest two checkpoints."""
    return ResumableRun(work, models, optimizers, {"data": data_gen}, vars(args), args.resume_from_checkpoint,
                        name=f"the {name} phase", keep=2)


def build_generator(args):
    return StyleGAN2Generator(
        size=args.resolution, style_dim=args.style_dim, n_mlp=args.n_mlp, channel_multiplier=1, channel_max=args.channel_max
    )


def build_encoder(args):
    """Image -> ``w`` encoder of the autoencoder phase: the DiffAE semantic encoder's small
    config (the Shapes DiffAE's), with ``style_dim`` outputs."""
    return SemanticEncoder(
        sample_size=args.resolution,
        model_channels=args.encoder_channels,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=1,
        attention_resolutions=(),
        z_sem_channels=args.style_dim,
    )


def init_generator(generator, folder):
    """Copy a trained generator folder's weights in.

    Raises FileNotFoundError when ``folder`` holds no generator, ValueError (naming the
    differing settings) when it was built with another config.
    """
    if not (Path(folder) / "config.json").is_file():
        raise FileNotFoundError(f"--init_from {folder}: no generator there (a StyleGAN2Generator.save_pretrained folder with config.json)")
    trained = StyleGAN2Generator.from_pretrained(folder)
    differ = {k: (trained.config[k], generator.config[k]) for k in ("size", "style_dim", "n_mlp", "channel_max") if trained.config[k] != generator.config[k]}
    if differ:
        settings = ", ".join(f"{k} {theirs} there, {ours} here" for k, (theirs, ours) in differ.items())
        raise ValueError(f"--init_from {folder} does not fit this run's generator ({settings}); pass the same settings")
    generator.load_state_dict(trained.state_dict())
    print(f"initialised the generator from {folder}")


def synthesis_parameters(generator):
    """Everything but the mapping network (``style.*``)."""
    return [p for name, p in generator.named_parameters() if not name.startswith("style.")]


def image_gradients(x):
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def reconstruction_loss(recon, real, edge_weight):
    """MSE plus ``edge_weight`` x the gradient difference loss (Mathieu et al. 2016): L1 between
    the images' horizontal and vertical finite differences.

    Why the edge term: shapes of the same colour and size differ in a few edge pixels, which
    MSE averages with a smooth background and rewards little; an MSE-only run still drew round
    blobs for squares and triangles after 1500 steps.
    """
    loss = F.mse_loss(recon, real)
    if edge_weight:
        loss = loss + edge_weight * sum(F.l1_loss(a, b) for a, b in zip(image_gradients(recon), image_gradients(real)))
    return loss


def train_autoencoder(args, renderer):
    """Encoder + synthesis network trained to reconstruct photos (:func:`reconstruction_loss`);
    the mapping network is left alone."""
    work = Path(args.work_dir) / "autoencoder"
    generator, encoder = build_generator(args), build_encoder(args)
    optimizer = torch.optim.Adam(
        [dict(params=synthesis_parameters(generator), lr=args.learning_rate), dict(params=encoder.parameters(), lr=args.learning_rate / 4)],
        betas=(0.0, 0.99),
    )
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    run = phase_run(args, work, {"generator": generator, "encoder": encoder}, {"adam": optimizer}, data_gen, "autoencoder")
    if not run.resumed and args.init_from:
        init_generator(generator, args.init_from)
    while run.running(args.max_steps, args.max_minutes):
        real = renderer.render(sample_factors(args.batch_size, generator=data_gen, style=SOURCE_STYLE), generator=data_gen)
        loss = reconstruction_loss(generator(encoder(real), input_is_latent=True)[0], real, args.edge_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite reconstruction loss at step {run.step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.step += 1
        if run.step % 25 == 0:
            print(dict(phase="autoencoder", step=run.step, loss=round(loss.item(), 5), minutes=round(run.minutes(), 2)), flush=True)
        if run.step % args.checkpointing_steps == 0:
            run.save()
    elapsed = run.save()
    test_gen = torch.Generator().manual_seed(args.seed + 3)
    real = renderer.render(sample_factors(16, generator=test_gen, style=SOURCE_STYLE), generator=test_gen)
    with torch.no_grad():
        recon = generator(encoder(real), input_is_latent=True)[0].clamp(-1, 1)
    grid([real, recon]).save(work / "reconstructions.png")
    record = dict(phase="autoencoder", steps=run.step, wall_seconds=elapsed, test_mse=F.mse_loss(recon, real).item(), init_from=args.init_from)
    if args.init_from and (Path(args.init_from) / "training_record.json").is_file():
        record["warm_start"] = json.loads((Path(args.init_from) / "training_record.json").read_text())
    (work / "training_record.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


def count_parameters(**modules):
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def write_generator(args, g_ema, facts):
    """``g_ema`` -> ``--output_dir`` (``save_pretrained``), a 32-sample grid and ``training_record.json``
    (also copied to ``--work_dir``) with the oracle's reading of 256 samples when the oracle exists."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    g_ema.save_pretrained(out)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        samples = g_ema([torch.randn(32, args.style_dim, generator=g)], randomize_noise=False)[0].clamp(-1, 1)
    grid([samples[:16], samples[16:]]).save(out / "samples.png")
    record = dict(
        task="shapes_stylegan2",
        phase=args.phase,
        command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        config=vars(args),
        **facts,
        torch_threads=torch.get_num_threads(),
    )
    if (Path(args.oracle) / "config.json").is_file():
        record["samples_oracle"] = oracle_report(g_ema, args.oracle)
    (out / "training_record.json").write_text(json.dumps(record, indent=1))
    (Path(args.work_dir) / "training_record.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


def train_mapping(args, renderer):
    """Mapping network z -> w trained adversarially in W against the encoder's codes of photos.

    The synthesis network and encoder come from the autoencoder phase's latest checkpoint and
    stay frozen. The discriminator is a 3-layer MLP on codes standardised with the bank's
    mean/std; loss and R1 as in the image GAN.
    """
    ae_work, work = Path(args.work_dir) / "autoencoder", Path(args.work_dir) / "mapping"
    ae_checkpoint = resolve_checkpoint(ae_work, "latest")
    if ae_checkpoint is None:
        raise FileNotFoundError(f"--phase mapping needs an autoencoder checkpoint in {ae_work}; run --phase autoencoder first")
    generator, encoder = build_generator(args), build_encoder(args)
    try:
        ae_steps, _ = load_checkpoint(ae_checkpoint, {"generator": generator, "encoder": encoder}, restore_rng=False)
    except RuntimeError as err:  # shape mismatches; the first line names the model
        raise ValueError(
            f"{ae_checkpoint} does not fit this run's models ({str(err).splitlines()[0]} ...); pass the "
            "autoencoder phase's --resolution / --style_dim / --n_mlp / --channel_max / --encoder_channels"
        ) from None
    generator.requires_grad_(False)
    mapping = generator.style.requires_grad_(True)
    encoder.requires_grad_(False).eval()
    bank_gen = torch.Generator().manual_seed(args.seed + 4)
    with torch.no_grad():
        sizes = [min(512, args.mapping_codes - start) for start in range(0, args.mapping_codes, 512)]
        bank = torch.cat([encoder(renderer.render(sample_factors(n, generator=bank_gen, style=SOURCE_STYLE), generator=bank_gen)) for n in sizes])
    mean, std = bank.mean(0), bank.std(0) + 1e-6
    critic = nn.Sequential(
        EqualLinear(args.style_dim, 2 * args.style_dim, activation="fused_lrelu"),
        EqualLinear(2 * args.style_dim, 2 * args.style_dim, activation="fused_lrelu"),
        EqualLinear(2 * args.style_dim, 1),
    )
    # The mapping network's equalised-LR multiplier (lr_mlp = 0.01) slows it down 100x so the
    # image GAN's synthesis can follow it; trained alone here, that slowdown is undone.
    g_optim = torch.optim.Adam(mapping.parameters(), lr=args.learning_rate / generator.config.lr_mlp, betas=(0.0, 0.99))
    d_optim = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, betas=(0.0, 0.99))
    data_gen = torch.Generator().manual_seed(args.seed + 5)
    run = phase_run(args, work, {"mapping": mapping, "critic": critic}, {"g_optim": g_optim, "d_optim": d_optim}, data_gen, "mapping")
    batch = args.mapping_batch_size
    total_steps = int(args.mapping_kimg * 1000 // batch)

    def critic_of(w):
        return critic((w - mean) / std)

    while run.running(total_steps, args.max_minutes):
        real = bank[torch.randint(0, bank.shape[0], (batch,), generator=data_gen)].requires_grad_(True)
        fake = mapping(torch.randn(batch, args.style_dim, generator=data_gen))
        real_logits = critic_of(real)
        (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
        d_loss = F.softplus(critic_of(fake.detach())).mean() + F.softplus(-real_logits).mean() + args.r1 / 2 * grad.pow(2).sum(1).mean()
        d_optim.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optim.step()
        g_loss = F.softplus(-critic_of(mapping(torch.randn(batch, args.style_dim, generator=data_gen)))).mean()
        g_optim.zero_grad(set_to_none=True)
        g_loss.backward()
        g_optim.step()
        if not (torch.isfinite(d_loss) and torch.isfinite(g_loss)):
            raise FloatingPointError(f"non-finite mapping GAN loss at step {run.step}: d={d_loss.item()}, g={g_loss.item()}")
        run.step += 1
        if run.step % 250 == 0:
            print(dict(phase="mapping", step=run.step, d_loss=round(d_loss.item(), 4), g_loss=round(g_loss.item(), 4), minutes=round(run.minutes(), 2)), flush=True)
        if run.step % (args.checkpointing_steps * 10) == 0:
            run.save()
    elapsed = run.save()
    ae_record = json.loads((ae_work / "training_record.json").read_text()) if (ae_work / "training_record.json").is_file() else None
    write_generator(
        args,
        generator.eval(),
        dict(steps=run.step, wall_seconds=elapsed, autoencoder=dict(checkpoint=str(ae_checkpoint), steps=ae_steps, record=ae_record),
             parameters=count_parameters(generator=generator, encoder=encoder, critic=critic)),
    )


def main(argv=None):
    args = parse_args(argv)
    # One run per --work_dir: two would rotate each other's checkpoints away.
    with output_lock(args.work_dir, "--work_dir"):
        return train(args)


def train(args):
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    renderer = ShapesRenderer(args.resolution)
    if args.phase == "autoencoder":
        return train_autoencoder(args, renderer)
    if args.phase == "mapping":
        return train_mapping(args, renderer)
    generator = build_generator(args)
    discriminator = StyleGAN2Discriminator(size=args.resolution, channel_multiplier=1, channel_max=args.channel_max)
    g_ema = copy.deepcopy(generator).eval()
    for p in g_ema.parameters():
        p.requires_grad_(False)
    # Lazy regularisation: D is regularised every k steps, so its Adam sees k/(k+1) of the updates.
    ratio = args.d_reg_every / (args.d_reg_every + 1)
    g_optim = torch.optim.Adam(generator.parameters(), lr=args.learning_rate, betas=(0.0, 0.99))
    d_optim = torch.optim.Adam(discriminator.parameters(), lr=args.learning_rate * ratio, betas=(0.0, 0.99**ratio))
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    models = {"generator": generator, "discriminator": discriminator, "g_ema": g_ema}
    run = phase_run(args, work, models, {"g_optim": g_optim, "d_optim": d_optim}, data_gen, "gan")
    if not run.resumed and args.init_from:
        init_generator(generator, args.init_from)
        g_ema.load_state_dict(generator.state_dict())
    ema_decay = 0.5 ** (args.batch_size / (args.ema_kimg * 1000))
    while run.running(args.max_steps, args.max_minutes):
        real = renderer.render(sample_factors(args.batch_size, generator=data_gen, style=SOURCE_STYLE), generator=data_gen)
        # Discriminator: softplus(D(fake)) + softplus(-D(real)), the non-saturating logistic loss.
        with torch.no_grad():
            fake = generator(mixed_latents(args.batch_size, args.style_dim, args.mixing, data_gen))[0]
        d_loss = F.softplus(discriminator(fake)).mean() + F.softplus(-discriminator(real)).mean()
        d_optim.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optim.step()
        if run.step % args.d_reg_every == 0:
            r1 = d_r1_penalty(discriminator, real)
            d_optim.zero_grad(set_to_none=True)
            # "* 0" ties D's output into the graph (rosinality does the same) so every parameter gets a grad.
            (args.r1 / 2 * r1 * args.d_reg_every + 0 * discriminator(real[:1]).sum()).backward()
            d_optim.step()
        # Generator: softplus(-D(G(z))).
        fake = generator(mixed_latents(args.batch_size, args.style_dim, args.mixing, data_gen))[0]
        g_loss = F.softplus(-discriminator(fake)).mean()
        g_optim.zero_grad(set_to_none=True)
        g_loss.backward()
        g_optim.step()
        if not (torch.isfinite(d_loss) and torch.isfinite(g_loss)):
            raise FloatingPointError(f"non-finite GAN loss at step {run.step}: d={d_loss.item()}, g={g_loss.item()}")
        accumulate(g_ema, generator, ema_decay)
        run.step += 1
        if run.step % 25 == 0:
            print(dict(phase="gan", step=run.step, d_loss=round(d_loss.item(), 4), g_loss=round(g_loss.item(), 4), minutes=round(run.minutes(), 2)), flush=True)
        if run.step % args.checkpointing_steps == 0:
            run.save()
    elapsed = run.save()
    write_generator(args, g_ema, dict(steps=run.step, wall_seconds=elapsed, parameters=count_parameters(generator=generator, discriminator=discriminator)))


if __name__ == "__main__":
    run_script(main, errors=(FileNotFoundError, ValueError))  # a user's mistake (a missing file, a bad value): one line, exit status 2
