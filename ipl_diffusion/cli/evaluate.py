"""``ipl evaluate``: the paper's metrics (IS, SIFID, SCS, ID), FID/KID, CLIP and diversity metrics.

Reads a folder of *adapted* images and, optionally, a folder of *source* images paired with
them by file name (``0001.png`` in both; extensions may differ), target-domain reference images
for SIFID (one score per reference, like Table 1's R1-R3), real target images for FID/KID, and
the source/target labels for the CLIP metrics. Every image, whatever its size or mode, goes
through ``ipl_diffusion.images`` (RGB, shorter side resized to ``--size``, centre crop, [-1, 1]).

Each pretrained network is a local file (or a Hub id already in your cache); nothing is
downloaded. With ``--metrics auto`` (default) every metric whose inputs and weights were given
is computed and the others are listed with what they need; naming a metric that cannot run is
an error. Prints a table; ``--json`` / ``--csv`` write the results (JSON adds per-image values).
"""

import argparse
import json
from pathlib import Path

from ipl_diffusion.errors import UserError, UserFileNotFoundError
from ipl_diffusion.outputs import atomic_write_text, check_writable

DESCRIPTION = __doc__.split("\n\n", 1)[1]
EPILOG = """examples:
  ipl evaluate --source out/src --adapted out/disney --reference refs/disney \\
      --inception-weights weights/inception_v3_google-0cc3c7bd.pth \\
      --hed-weights weights/network-bsds500.pytorch --arcface-weights weights/model_ir_se50.pth \\
      --json disney.json
  ipl evaluate --source src --adapted dst --clip-model ./clip-vit-base-patch32 \\
      --source-label photo --target-label "wall painting" --metrics clip_direction,clip_score

metrics: is, sifid, scs, id, fid, kid, clip_score, clip_direction, pairwise_lpips, intra_lpips
weights (upstream files, loaded in their published layouts):
  --inception-weights      torchvision inception_v3_google-0cc3c7bd.pth   (IS, SIFID)
  --fid-inception-weights  pytorch-fid pt_inception-2015-12-05-6726825d.pth (FID, KID)
  --hed-weights            sniklaus/pytorch-hed network-bsds500.pytorch    (SCS)
  --arcface-weights        pSp/TreB1eN model_ir_se50.pth                    (ID, faces)
  --lpips-backbone-weights torchvision alexnet-owt-7be5be79.pth / vgg16-397923af.pth (LPIPS)
"""


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "evaluate",
        help="compute IS, SIFID, SCS, ID, FID/KID, CLIP and diversity metrics on image folders",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = parser.add_argument_group("images")
    io.add_argument("--adapted", required=True, help="folder of adapted (generated / translated) images")
    io.add_argument("--source", help="folder of source images, paired with --adapted by file name")
    io.add_argument("--reference", nargs="+", help="target-domain reference image files or folders (SIFID)")
    io.add_argument("--real", help="folder of real target-domain images (FID / KID)")
    io.add_argument("--cluster-centers", help="folder of cluster centres for intra-cluster LPIPS (default: --reference)")
    io.add_argument("--size", type=int, default=256, help="images are resized/cropped to SIZE x SIZE (default: 256)")
    io.add_argument("--source-label", help="source domain label for CLIP directional similarity, e.g. 'photo'")
    io.add_argument("--target-label", help="target domain label for the CLIP metrics, e.g. 'wall painting'")
    run = parser.add_argument_group("protocol")
    run.add_argument("--metrics", default="auto", help="comma-separated metric names, or 'auto' (default)")
    run.add_argument("--splits", type=int, default=5, help="Inception Score splits (default: 5, as RSSA)")
    run.add_argument("--sifid-dims", type=int, choices=(64, 192), default=64,
                     help="SIFID features: SinGAN's 64-channel block 0 (default) or 192-channel block 1")
    run.add_argument("--max-pairs", type=int, default=None, help="diversity: at most this many random pairs")
    run.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size (capped to the set sizes)")
    run.add_argument("--batch-size", type=int, default=16, help="images per network call (default: 16)")
    run.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    nets = parser.add_argument_group("networks (local files or cached Hub ids)")
    nets.add_argument("--inception-weights", help="torchvision Inception-v3 weights (IS, SIFID)")
    nets.add_argument("--fid-inception-weights", help="pytorch-fid Inception weights (FID, KID)")
    nets.add_argument("--hed-weights", help="HED BSDS500 weights (SCS)")
    nets.add_argument("--arcface-weights", help="ArcFace IR-SE50 weights (ID)")
    nets.add_argument("--lpips-backbone-weights", help="torchvision AlexNet / VGG16 weights (LPIPS)")
    nets.add_argument("--lpips-lin-weights", help="LPIPS v0.1 linear layers (default: the copy shipped by torchmetrics)")
    nets.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex", help="LPIPS backbone (default: alex)")
    nets.add_argument("--diversity-network", choices=("lpips", "clip"), default="lpips",
                      help="distance for the diversity metrics: LPIPS, or CLIP image features (default: lpips)")
    nets.add_argument("--identity-network", choices=("arcface", "clip"), default="arcface",
                      help="ID features: ArcFace for faces (default), or CLIP image features for other domains")
    nets.add_argument("--clip-model", help="CLIP folder or Hub id with model, tokenizer and image processor")
    nets.add_argument("--clip-templates", choices=("imagenet", "nada", "single"), default="imagenet",
                      help="prompt templates averaged for label features (default: imagenet)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", help="write results (and per-image values) to this JSON file")
    out.add_argument("--csv", help="write the results table to this CSV file")
    return parser


def pair_by_name(source_files, adapted_files):
    """Match files by stem; returns ``(source_paths, adapted_paths, names)`` in adapted order.

    Raises:
        UserError: a stem appears twice in one folder, or names present in only one folder
            (the message lists some of each).
    """
    def by_stem(files, flag):
        table = {}
        for f in files:
            if f.stem in table:
                raise UserError(f"{flag}: '{table[f.stem].name}' and '{f.name}' have the same name; pairing is by name")
            table[f.stem] = f
        return table

    src, dst = by_stem(source_files, "--source"), by_stem(adapted_files, "--adapted")
    only_src, only_dst = sorted(set(src) - set(dst)), sorted(set(dst) - set(src))
    if only_src or only_dst:
        raise UserError(
            "--source and --adapted must hold the same file names (pairs share a name): "
            f"{len(only_dst)} adapted without a source {only_dst[:5]}, {len(only_src)} sources without an adapted "
            f"image {only_src[:5]}"
        )
    names = sorted(dst)
    return [src[n] for n in names], [dst[n] for n in names], [dst[n].name for n in names]


def _image_files(spec, flag):
    """Files of one folder or of a list of files / folders, sorted; checked before anything is built."""
    from ipl_diffusion.images import list_image_files

    files = []
    for item in [spec] if isinstance(spec, str) else spec:
        path = Path(item)
        if path.is_file():
            files.append(path)
        else:
            try:
                files += list_image_files(path)
            except FileNotFoundError as err:
                raise UserFileNotFoundError(f"{flag}: {err}") from None
    return files


def format_table(rows, skipped=None):
    """Aligned text table of result rows, then one line per skipped metric."""
    header = ("metric", "value", "std", "n", "better", "note")
    lines = [header] + [
        (r["metric"], f"{r['value']:.4f}", "" if r["std"] is None else f"{r['std']:.4f}", str(r["n"] or ""),
         "higher" if r["higher_is_better"] else "lower", r["note"])
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    for metric, reason in (skipped or {}).items():
        text.append(f"skipped {metric}: {reason}")
    return "\n".join(text)


def write_csv(path, rows):
    """The result rows as CSV, written atomically (a crash leaves the earlier file or the new one)."""
    import csv
    import io

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["metric", "value", "std", "n", "higher_is_better", "note"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def run(args) -> int:
    import torch

    from ipl_diffusion.images import load_images
    from ipl_diffusion.metrics.suite import METRICS, EvaluationInputs, MetricNetworks, evaluate

    metrics = "auto" if args.metrics.strip() == "auto" else [m.strip() for m in args.metrics.split(",") if m.strip()]
    if metrics != "auto":
        unknown = [m for m in metrics if m not in METRICS]
        if unknown or not metrics:
            raise UserError(f"--metrics: unknown {unknown}; choose from auto or {', '.join(METRICS)}")
    if args.splits < 1 or args.batch_size < 1 or args.size < 1:
        raise UserError("--splits, --batch-size and --size must be positive")
    for flag in ("json", "csv"):
        target = getattr(args, flag)
        if target and not Path(target).resolve().parent.is_dir():
            raise UserFileNotFoundError(f"--{flag}: the folder of {target} does not exist")
        if target:  # before any network is built or image decoded
            if Path(target).is_dir():
                raise UserError(f"--{flag} {target} is a folder; give a file name")
            check_writable(Path(target).resolve().parent, f"--{flag} {target}: its folder")

    # 1. Every folder is listed and paired before any network is built: a bad path fails in a second.
    adapted_files = _image_files(args.adapted, "--adapted")
    source_files = None
    if args.source:
        source_files, adapted_files, names = pair_by_name(_image_files(args.source, "--source"), adapted_files)
    else:
        names = [f.name for f in adapted_files]
    reference_files = _image_files(args.reference, "--reference") if args.reference else None
    real_files = _image_files(args.real, "--real") if args.real else None
    center_files = _image_files(args.cluster_centers, "--cluster-centers") if args.cluster_centers else None

    # 2. Networks: a missing or wrong weights file fails here, before images are decoded.
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from ipl_diffusion.clip_loading import CLIPNotFoundError

    try:
        nets = MetricNetworks.from_weights(
            inception_weights=args.inception_weights, fid_inception_weights=args.fid_inception_weights,
            hed_weights=args.hed_weights, arcface_weights=args.arcface_weights,
            lpips_backbone_weights=args.lpips_backbone_weights, lpips_lin_weights=args.lpips_lin_weights,
            lpips_net=args.lpips_net, clip=args.clip_model, diversity_network=args.diversity_network,
            identity_network=args.identity_network, device=device,
            clip_templates=args.clip_templates,
        )
    except CLIPNotFoundError as err:  # its advice names the Python API; here the flag is the way
        raise UserFileNotFoundError(f"--clip-model: {err.with_advice('`--clip-model ./clip`')}") from err

    # 3. Images, through the one preprocessing path.
    def load(files):
        return None if files is None else load_images(files, args.size)[0]

    inputs = EvaluationInputs(
        adapted=load(adapted_files), source=load(source_files), references=load(reference_files),
        reference_names=[f.name for f in reference_files] if reference_files else [], real=load(real_files),
        cluster_centers=load(center_files), source_label=args.source_label, target_label=args.target_label,
    )
    result = evaluate(inputs, nets, metrics, splits=args.splits, batch_size=args.batch_size,
                      kid_subset_size=args.kid_subset_size, max_pairs=args.max_pairs,
                      sifid_dims=args.sifid_dims)

    print(format_table(result["rows"], result["skipped"]))
    if args.json:
        per_image = {
            name: {col: float(values[i]) for col, values in result["per_image"].items()} for i, name in enumerate(names)
        }
        payload = {
            "inputs": {"adapted": args.adapted, "source": args.source, "reference": args.reference, "real": args.real,
                       "size": args.size, "source_label": args.source_label, "target_label": args.target_label,
                       "n_adapted": len(names)},
            "metrics": result["rows"],
            "skipped": result["skipped"],
            "per_image": per_image,
        }
        atomic_write_text(args.json, json.dumps(payload, indent=2))
    if args.csv:
        write_csv(args.csv, result["rows"])
    return 0
