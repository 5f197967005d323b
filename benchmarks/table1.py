#!/usr/bin/env python
"""IPL's Table 1 (Guo et al., CVPR 2023, Sec. 4.1-4.2): NADA vs IPL on 10 StyleGAN2 settings.

For every setting (FFHQ: Photo -> Disney ... Human -> Werewolf; AFHQ-Dog: Photo -> Cartoon,
Pointillism, Cubism) the source generator is adapted twice with the same seed -- NADA (the
``manual`` prompt scheme) and IPL (the ``adaptive`` scheme, Stage 1 + Stage 2) -- and both are
scored on the same latents:

* **IS** of ``--num-samples`` adapted samples (1000, 5 splits, no resize; RSSA's protocol);
* **SCS** and **ID** on the first ``--num-pairs`` (500) source/adapted pairs (HED edges;
  ArcFace IR-SE50 for FFHQ; for AFHQ the paper's fine-grained recogniser is not public, so ID is
  "n/a" unless ``--afhq-identity clip`` substitutes CLIP image features -- say so if you report it);
* **SIFID** of the adapted samples against each of the three reference images R1-R3 of the
  target domain (``--references DIR/<target>/``, e.g. ``DIR/disney/R1.png``), averaged over samples.

Samples are drawn with the pipeline's fixed noise maps at truncation ``--truncation`` and go
through the package's one image path (8-bit RGB, resized to ``--eval-size``, [-1, 1]), exactly
what ``ipl evaluate`` does with saved files; ``--output-dir`` saves them so any number can be
re-checked with ``ipl evaluate``. The table prints ``ours (paper)`` in every cell.

    python benchmarks/table1.py --ffhq-generator stylegan2-ffhq-config-f.pt \\
        --afhq-generator afhqdog.pt --clip ./clip-vit-base-patch32 \\
        --inception-weights inception_v3_google-0cc3c7bd.pth --hed-weights network-bsds500.pytorch \\
        --arcface-weights model_ir_se50.pth --references ./table1_refs --output-dir runs/table1

The paper picks lambda of Eq. 6 per domain in [1, 10] by the best IS; ``--lambda-domain`` sets
one value for all settings. Needs a GPU for the real models (about 10-20 min per adaptation on
an RTX 3090 per the paper, plus metric time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ipl_diffusion.images import load_image, load_images, to_pil  # noqa: E402
from ipl_diffusion.metrics import (  # noqa: E402
    identity_similarity,
    inception_score,
    sifid,
    structural_consistency,
)
from ipl_diffusion.metrics.suite import MetricNetworks  # noqa: E402

METHODS = {"NADA": "manual", "IPL": "adaptive"}


@dataclass(frozen=True)
class Setting:
    """One row of Table 1 with the paper's numbers: ``(NADA, IPL)`` pairs, SIFID per reference."""

    dataset: str
    source: str
    target: str
    is_: tuple
    scs: tuple
    id_: tuple
    sifid_nada: tuple
    sifid_ipl: tuple

    @property
    def name(self):
        return f"{self.source}→{self.target}"

    @property
    def slug(self):
        """Folder name of the target's reference images: ``"Anime painting"`` -> ``anime_painting``."""
        return self.target.lower().replace(" ", "_")

    def paper(self, metric, method):
        i = 0 if method == "NADA" else 1
        if metric == "is":
            return self.is_[i]
        if metric == "scs":
            return self.scs[i]
        if metric == "id":
            return self.id_[i]
        k = int(metric[-1]) - 1  # "sifid_R1" ...
        return (self.sifid_nada if method == "NADA" else self.sifid_ipl)[k]


# Table 1 of the paper, in its row order.
TABLE1 = (
    Setting("FFHQ", "Photo", "Disney", (2.721, 3.089), (0.407, 0.448), (0.782, 0.801), (2.776, 3.136, 3.670), (2.517, 2.930, 3.497)),
    Setting("FFHQ", "Photo", "Anime painting", (2.450, 3.051), (0.324, 0.518), (0.666, 0.776), (2.956, 1.811, 1.242), (2.845, 1.595, 1.021)),
    Setting("FFHQ", "Photo", "Wall painting", (2.183, 2.676), (0.439, 0.487), (0.594, 0.637), (1.944, 1.220, 1.331), (1.930, 1.183, 1.274)),
    Setting("FFHQ", "Photo", "Ukiyo-e", (2.205, 2.974), (0.420, 0.506), (0.775, 0.632), (1.954, 1.990, 1.326), (1.165, 1.255, 0.878)),
    Setting("FFHQ", "Human", "Pixar character", (2.703, 2.785), (0.379, 0.461), (0.757, 0.853), (0.793, 0.932, 0.865), (0.638, 0.821, 1.092)),
    Setting("FFHQ", "Human", "Tolkien elf", (2.479, 2.778), (0.416, 0.491), (0.711, 0.772), (0.632, 1.495, 1.452), (0.690, 0.637, 0.701)),
    Setting("FFHQ", "Human", "Werewolf", (2.619, 2.809), (0.399, 0.417), (0.642, 0.747), (1.969, 1.846, 1.967), (1.734, 1.688, 1.911)),
    Setting("AFHQ", "Photo", "Cartoon", (6.505, 8.658), (0.407, 0.563), (0.925, 0.941), (2.708, 2.672, 3.870), (2.517, 2.477, 3.278)),
    Setting("AFHQ", "Photo", "Pointillism", (5.419, 6.913), (0.224, 0.542), (0.775, 0.881), (7.081, 5.288, 7.142), (4.818, 3.089, 4.074)),
    Setting("AFHQ", "Photo", "Cubism", (4.165, 6.450), (0.386, 0.463), (0.934, 0.943), (2.779, 2.938, 3.199), (2.431, 2.956, 2.284)),
)
COLUMNS = ("is", "scs", "id", "sifid_R1", "sifid_R2", "sifid_R3")


@torch.no_grad()
def sample_for_evaluation(pipe, z, source, truncation, eval_size, batch_size):
    """``(N, 3, S, S)`` in [-1, 1]: generator samples passed through the package's image path."""
    out = []
    for start in range(0, z.shape[0], batch_size):
        images = pipe(latents=z[start:start + batch_size], source=source, truncation=truncation, output_type="pt").images
        out += [load_image(pil, eval_size) for pil in to_pil(images * 2 - 1)]
    return torch.stack(out)


def load_references(references_dir, settings):
    """``{target slug: ((3, 3, H, W) tensor, names)}``, checked for every setting before any training."""
    refs = {}
    if references_dir is None:
        return refs
    for setting in settings:
        folder = Path(references_dir) / setting.slug
        if not folder.is_dir():
            raise FileNotFoundError(f"--references: no folder {folder} with the 3 reference images of '{setting.target}'")
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if len(files) != 3:
            raise ValueError(f"--references: {folder} must hold exactly 3 images (R1-R3 in name order), found {len(files)}")
        refs[setting.slug] = files
    return refs


def save_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, pil in enumerate(to_pil(images)):
        pil.save(folder / f"{i:05d}.png")


def evaluate_method(adapted_images, source_images, nets, identity, references, num_pairs, splits, batch_size,
                    sifid_dims=64):
    """One Table-1 cell group: ``{"is", "scs", "id", "sifid_R1".."sifid_R3"}`` (``None`` = not computed)."""
    row = dict.fromkeys(COLUMNS)
    pairs = slice(0, num_pairs)
    if nets.inception is not None:
        row["is"] = inception_score(adapted_images, nets.inception, splits=splits, batch_size=batch_size)[0]
        for k, reference in enumerate(references if references is not None else []):
            row[f"sifid_R{k + 1}"] = float(sifid(reference, adapted_images, nets.inception, dims=sifid_dims).mean())
    if nets.hed is not None:
        row["scs"] = float(structural_consistency(source_images[pairs], adapted_images[pairs], nets.hed, batch_size).mean())
    if identity is not None:
        row["id"] = float(identity_similarity(source_images[pairs], adapted_images[pairs], identity, batch_size).mean())
    return row


@dataclass
class Protocol:
    """How every setting is sampled and scored: ``num_samples`` images per method from fixed
    ``z`` (``seed``) at truncation ``truncation``, resized to ``eval_size``; ``num_pairs``
    source/adapted pairs for SCS and ID; ``splits`` for IS; ``sifid_dims`` Inception features."""

    num_samples: int = 1000
    num_pairs: int = 500
    splits: int = 5
    eval_size: int = 256
    truncation: float = 0.7
    seed: int = 0
    batch_size: int = 16
    sifid_dims: int = 64


def run_table1(source_pipelines, nets, settings=TABLE1, methods=("NADA", "IPL"), identity_by_dataset=None,
               references=None, protocol=None, adapt_kwargs=None, output_dir=None, log=print):
    """Adapt and score every setting whose dataset has a source pipeline.

    Args:
        protocol: :class:`Protocol` (default: the paper's sizes).
        source_pipelines: ``{"FFHQ": StyleGANIPLPipeline, "AFHQ": ...}`` (source pipelines with CLIP).
        nets: :class:`MetricNetworks` (``inception`` for IS/SIFID, ``hed`` for SCS).
        identity_by_dataset: ``{"FFHQ": ArcFaceFeatures(...), "AFHQ": None}``; ``None`` -> "n/a".
        references: ``{slug: [3 files]}`` (see :func:`load_references`); missing -> SIFID "n/a".
        adapt_kwargs: extra arguments of ``StyleGANIPLPipeline.adapt`` (iterations, lambda...).

    Returns:
        ``[{"setting": Setting, "ours": {method: row}}]`` in table order.
    """
    p = protocol or Protocol()
    identity_by_dataset = identity_by_dataset or {}
    references = references or {}
    results = []
    for setting in settings:
        pipe = source_pipelines.get(setting.dataset)
        if pipe is None:
            continue
        generator = torch.Generator().manual_seed(p.seed)
        z = torch.randn((p.num_samples, pipe.source_generator.style_dim), generator=generator)
        source_images = sample_for_evaluation(pipe, z, True, p.truncation, p.eval_size, p.batch_size)
        refs = None
        if setting.slug in references:
            refs = load_images(references[setting.slug], p.eval_size)[0]
        row = {"setting": setting, "ours": {}}
        for method in methods:
            log(f"[{setting.dataset}] {setting.name}: adapting with {method}")
            adapted = pipe.adapt(setting.target.lower(), source=setting.source.lower(), scheme=METHODS[method],
                                 seed=p.seed, **(adapt_kwargs or {}))
            adapted_images = sample_for_evaluation(adapted, z, False, p.truncation, p.eval_size, p.batch_size)
            if output_dir is not None:
                base = Path(output_dir) / setting.dataset.lower() / setting.slug
                save_images(base / "source", source_images)
                save_images(base / method.lower(), adapted_images)
            row["ours"][method] = evaluate_method(adapted_images, source_images, nets,
                                                  identity_by_dataset.get(setting.dataset), refs, p.num_pairs, p.splits,
                                                  p.batch_size, p.sifid_dims)
        results.append(row)
    return results


def format_table1(results):
    """Table 1's layout; every cell ``ours (paper)``; ``n/a`` where a metric was not computed."""
    groups = [("IS", "is"), ("SCS", "scs"), ("ID", "id")]
    header = ["Dataset", "Source→Target"]
    header += [f"{g} {m}" for g, _ in groups for m in ("NADA", "IPL")]
    header += [f"SIFID {m} R{k}" for m in ("NADA", "IPL") for k in (1, 2, 3)]
    lines = [header]
    for row in results:
        setting, ours = row["setting"], row["ours"]

        def cell(metric, method):
            value = ours.get(method, {}).get(metric)
            return f"{'n/a' if value is None else f'{value:.3f}'} ({setting.paper(metric, method):.3f})"

        line = [setting.dataset, setting.name]
        line += [cell(key, m) for _, key in groups for m in ("NADA", "IPL")]
        line += [cell(f"sifid_R{k}", m) for m in ("NADA", "IPL") for k in (1, 2, 3)]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append("cells: ours (paper). IS, SCS, ID: higher is better; SIFID: lower is better.")
    return "\n".join(text)


def select_settings(spec, datasets):
    """Rows by 1-based number or target name (comma-separated), limited to datasets with a generator."""
    rows = [s for s in TABLE1 if s.dataset in datasets]
    if spec in (None, "", "all"):
        return rows
    chosen = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        if token.isdigit() and 1 <= int(token) <= len(TABLE1):
            setting = TABLE1[int(token) - 1]
        else:
            matches = [s for s in TABLE1 if s.target.lower() == token.lower() or s.slug == token.lower()]
            if not matches:
                raise ValueError(f"--settings: {token!r} is neither a row number 1-10 nor a Table 1 target")
            setting = matches[0]
        if setting.dataset not in datasets:
            raise ValueError(f"--settings: row '{setting.name}' needs --{setting.dataset.lower()}-generator")
        chosen.append(setting)
    return chosen


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for the protocol.")
    parser.add_argument("--ffhq-generator", help="FFHQ StyleGAN2: rosinality .pt or converted folder (rows 1-7)")
    parser.add_argument("--afhq-generator", help="AFHQ-Dog StyleGAN2: rosinality .pt or converted folder (rows 8-10)")
    parser.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP ViT-B/32 folder or cached Hub id")
    parser.add_argument("--inception-weights", help="torchvision inception_v3_google-0cc3c7bd.pth (IS, SIFID)")
    parser.add_argument("--hed-weights", help="sniklaus network-bsds500.pytorch (SCS)")
    parser.add_argument("--arcface-weights", help="model_ir_se50.pth (ID on FFHQ)")
    parser.add_argument("--afhq-identity", choices=("none", "clip"), default="none",
                        help="ID features for AFHQ: none ('n/a', default) or CLIP image features (a substitute)")
    parser.add_argument("--references", help="folder with one sub-folder of 3 reference images per target (SIFID)")
    parser.add_argument("--settings", default="all", help="rows to run: 'all' or numbers / targets, e.g. '1,8'")
    parser.add_argument("--methods", default="NADA,IPL", help="comma-separated subset of NADA,IPL")
    parser.add_argument("--num-samples", type=int, default=1000, help="samples for IS and SIFID (default 1000)")
    parser.add_argument("--num-pairs", type=int, default=500, help="source/adapted pairs for SCS and ID (default 500)")
    parser.add_argument("--splits", type=int, default=5, help="IS splits (default 5)")
    parser.add_argument("--eval-size", type=int, default=256, help="evaluation resolution (default 256)")
    parser.add_argument("--truncation", type=float, default=0.7, help="sampling truncation (IPL eval.py: 0.7)")
    parser.add_argument("--sifid-dims", type=int, choices=(64, 192), default=64,
                        help="SIFID features: SinGAN's 64-channel block 0 (default) or 192-channel block 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lambda-domain", type=float, default=1.0, help="lambda of Eq. 6 for every setting")
    parser.add_argument("--iterations", type=int, default=300, help="Stage 2 iterations (paper: 300)")
    parser.add_argument("--stage1-iterations", type=int, default=300, help="Stage 1 iterations (paper: 300)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per generator / metric call")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--output-dir", help="save samples (source / nada / ipl per setting) and results.json here")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    generators = {"FFHQ": args.ffhq_generator, "AFHQ": args.afhq_generator}
    generators = {k: v for k, v in generators.items() if v}
    if not generators:
        raise SystemExit("table1: give --ffhq-generator and/or --afhq-generator")
    methods = [m.strip().upper() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        raise SystemExit(f"table1: --methods must be a subset of {','.join(METHODS)}")
    settings = select_settings(args.settings, set(generators))
    references = load_references(args.references, settings)  # fail before any training
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    nets = MetricNetworks.from_weights(inception_weights=args.inception_weights, hed_weights=args.hed_weights,
                                       arcface_weights=args.arcface_weights, device=device)
    pipelines = {name: StyleGANIPLPipeline.from_components(path, args.clip).to(device) for name, path in generators.items()}
    identity = {"FFHQ": nets.identity_features}
    if args.afhq_identity == "clip" and "AFHQ" in pipelines:
        from ipl_diffusion.clip_text import CLIPPromptEncoder

        pipe = pipelines["AFHQ"]
        encoder = CLIPPromptEncoder(pipe.text_encoder, pipe.tokenizer, pipe.feature_extractor or {
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]})
        identity["AFHQ"] = encoder.encode_images
    results = run_table1(
        pipelines, nets, settings, methods, identity, references, output_dir=args.output_dir,
        protocol=Protocol(num_samples=args.num_samples, num_pairs=args.num_pairs, splits=args.splits,
                          eval_size=args.eval_size, truncation=args.truncation, seed=args.seed,
                          batch_size=args.batch_size, sifid_dims=args.sifid_dims),
        adapt_kwargs=dict(lambda_domain=args.lambda_domain, iterations=args.iterations,
                          stage1_iterations=args.stage1_iterations),
    )
    print(format_table1(results))
    if args.output_dir:
        payload = [{"dataset": r["setting"].dataset, "setting": r["setting"].name, "ours": r["ours"],
                    "paper": {m: {c: r["setting"].paper(c, m) for c in COLUMNS} for m in ("NADA", "IPL")}}
                   for r in results]
        Path(args.output_dir, "results.json").write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
