"""`ipl translate`: translate a folder of real images with an adapted pipeline.

Each readable image is inverted with the source model and decoded with the adapted one
(DiffAE: deterministic DDIM inversion; StyleGAN2: projection into W+). Results keep their
file names, at the model's resolution, in `--output` (which must not be the input folder;
inputs are never overwritten). Files that cannot be read as images are skipped and listed.
A side-by-side grid (input | translation) is written to `ipl_grid/translation.png`, in a
sub-folder so it can never replace a translation and `--output` holds only translations
(ready for `ipl evaluate`, which pairs files by name). Files already in `--output` under the
names this run would write are refused before the model loads, unless `--overwrite`.
"""

import argparse
from pathlib import Path

from ipl_diffusion.cli.argtypes import positive_int
from ipl_diffusion.errors import UserError, UserFileExistsError, UserFileNotFoundError

DESCRIPTION = __doc__.split("\n\n", 1)[1]
EPILOG = """examples:
  ipl translate --model ipl-sketch/pipeline --input ./photos --output ./sketches
  ipl translate --model ./ffhq-wall-painting --input faces --output out --t0 500 --steps 40
"""
GRID_NAME = Path("ipl_grid") / "translation.png"


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "translate",
        help="translate a folder of images with an adapted pipeline",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="adapted pipeline folder or Hub id (from `ipl adapt`)")
    parser.add_argument("--input", required=True, help="folder of images (or a single image file)")
    parser.add_argument("--output", required=True, help="folder for the translated images (created)")
    parser.add_argument(
        "--backend",
        choices=("diffae", "stylegan2"),
        default=None,
        help="generator family (default: read from the --model folder, else diffae)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace same-name files already in --output")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default: 8)")
    parser.add_argument("--t0", type=int, default=None, help="DiffAE: inversion depth (default: the adaptation's)")
    parser.add_argument("--steps", type=int, default=None, help="DiffAE: DDIM decoding steps")
    parser.add_argument("--inversion-steps", type=int, default=None, help="DiffAE: DDIM inversion steps")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    return parser


def list_inputs(path: Path) -> list[Path]:
    """Image files of `path` (a folder, non-recursive, sorted by name) or `[path]`."""
    if not path.exists():
        raise UserFileNotFoundError(f"--input {path} does not exist; expected a folder of images or an image file")
    if path.is_file():
        return [path]
    from ipl_diffusion.images import list_image_files

    return list_image_files(path, option="--input")


def load_inputs(files, size):
    """`(names, tensors (B,3,S,S) in [-1,1], skipped)` through the project's one image path;
    `skipped` lists `(name, reason)` for files that could not be read."""
    import torch

    from ipl_diffusion.images import load_image

    names, tensors, skipped = [], [], []
    for file in files:
        try:
            tensors.append(load_image(file, size))
            names.append(file.name)
        except (ValueError, OSError) as err:
            skipped.append((file.name, str(err).splitlines()[0]))
    return names, (torch.stack(tensors) if tensors else None), skipped


def _save(image, target: Path) -> Path:
    """Save atomically (never a half-written file under a user's name); a format PIL reads
    but cannot write falls back to PNG."""
    from ipl_diffusion.outputs import atomic_save_image

    try:
        return atomic_save_image(image, target)
    except (OSError, ValueError, KeyError):  # e.g. a format PIL reads but cannot write
        return atomic_save_image(image, target.with_suffix(".png"))


def run(args) -> int:
    from ipl_diffusion.outputs import check_writable, output_lock

    source, output = Path(args.input), Path(args.output)
    check_writable(output, "--output")  # before the model loads
    with output_lock(output, "--output"):  # two translations into one folder would mix their files
        return _translate(args, source, output)


def _translate(args, source: Path, output: Path) -> int:
    import torch

    from ipl_diffusion.cli.adapt import detect_backend, load_pipeline
    from ipl_diffusion.grids import labelled_grid
    from ipl_diffusion.images import to_pil
    from ipl_diffusion.outputs import atomic_save_image, listing

    files = list_inputs(source)
    input_dir = source if source.is_dir() else source.parent
    if output.resolve() == input_dir.resolve():
        raise UserError(f"--output {output} is the input folder; choose another folder so inputs are kept")
    if not args.overwrite:
        taken = sorted(f.name for f in files if (output / f.name).exists())
        if taken:
            raise UserFileExistsError(
                f"--output {output} already holds {listing(taken)}, which this run would write; "
                "choose another folder or pass --overwrite"
            )
    args.backend = detect_backend(args.backend, args.model)
    pipe = load_pipeline(args.backend, args.model, args.device, clip=False)
    size = int(getattr(pipe, "image_size", 0) or pipe.config.get("resolution", 256))
    names, images, skipped = load_inputs(files, size)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}")
    if images is None:
        raise UserError(f"none of the {len(files)} image file(s) in {source} could be read")

    output.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if args.backend == "diffae":
        options = (("t0", args.t0), ("num_inference_steps", args.steps), ("num_inversion_steps", args.inversion_steps))
        kwargs = {key: value for key, value in options if value is not None}
    results = []
    for start in range(0, len(images), args.batch_size):
        batch = images[start : start + args.batch_size]
        if args.backend == "stylegan2":
            generator = torch.Generator().manual_seed(args.seed + start)
            results.extend(pipe.translate(batch, generator=generator, output_type="pil"))
        else:
            results.extend(pipe(batch, output_type="pil", **kwargs).images)
    inputs = {f.resolve() for f in files}
    for name, image in zip(names, results):
        target = output / name
        if target.resolve() in inputs:
            raise UserError(f"refusing to overwrite input {target}")
        _save(image, target)
    (output / GRID_NAME).parent.mkdir(exist_ok=True)
    # A row per pair, input | translation, seamless at the model's resolution.
    pairs = [[before, after] for before, after in zip(to_pil(images), results)]
    atomic_save_image(labelled_grid(pairs, min_tile=0, margin=0), output / GRID_NAME)
    print(f"translated {len(results)} image(s) into {output} (grid: {output / GRID_NAME})")
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s): {', '.join(n for n, _ in skipped)}")
    return 0
