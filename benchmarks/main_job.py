#!/usr/bin/env python
"""The main job, measured on what it never saw: ``ipl adapt`` with the shipped settings.

For every backend and Shapes target this runs exactly what a user runs,
``ipl adapt [--backend B] --target T --output_dir DIR --seed S`` (no other option, so the shipped
folders' ``adapt_defaults`` decide everything), loads ``DIR/pipeline`` back from disk, and
judges it on images the run never trained on:

* **diffae** -- ``--eval_images`` photos rendered with seed 31337 (the run renders its training
  photos with ``--seed``), translated by the adapted pipeline (DDIM inversion with the source
  UNet, decoding with the adapted one, the recorded ``t0`` / steps). The oracle compares each
  translation with the renderer's ground truth of its photo.
* **stylegan2** -- ``--eval_images`` fixed ``z`` (seed 31337, truncation 0.7 as NADA / IPL
  sample), rendered by the adapted ``g_ema`` and by the source generator; each adapted image
  is compared with the oracle's reading of the source image of the same ``z``.

Per run it reports the fraction the oracle reads as the target style, shape kept, colour
kept and the wall-clock seconds of ``ipl adapt`` (load + both stages + saving), and writes
``--output_dir/results.json``, ``table.md`` and a labelled grid of 8 held-out examples per run
(``grids/``) -- look at those: the oracle can be fooled (a pale background alone reads as
"sketch" to it). The runs themselves go to a temporary ``--work_dir`` (removed afterwards).

An image-defined target (``--style_images N``): ``N`` images of the target style are rendered
(seed 4242, never the held-out seed) into ``DIR`` and the run is ``ipl adapt --target_images DIR
[--target T]`` (``--no_label`` leaves ``--target`` out, so the style images alone define the
target); the scoring is the same. Their grid goes to ``grids/<run>_style_images.png``.

Usage::

    python benchmarks/main_job.py                         # both backends, every target, seed 0
    python benchmarks/main_job.py --backends diffae --targets sketch --seeds 0 1 2
    python benchmarks/main_job.py --targets sketch --style_images 4 --no_label --output_dir benchmarks/results/image_target
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from ipl_diffusion.grids import labelled_grid  # noqa: E402
from ipl_diffusion.shapes import STYLES, ShapesRenderer, default_model_path  # noqa: E402
from ipl_diffusion.shapes.oracle import ShapesOracle  # noqa: E402

TARGETS = ("sketch", "neon", "pixel art", "mosaic")
EVAL_SEED = 31337
STYLE_SEED = 4242  # the rendered style images of an image-defined target


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["diffae", "stylegan2"], choices=("diffae", "stylegan2"))
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--eval_images", type=int, default=32)
    p.add_argument("--output_dir", default="benchmarks/results/main_job", help="results.json, table.md and grids/")
    p.add_argument("--work_dir", default=None, help="where the `ipl adapt` runs go (default: a temporary folder, removed)")
    p.add_argument("--style_images", type=int, default=0, help="render N target-style images and pass --target_images")
    p.add_argument("--no_label", action="store_true", help="with --style_images: no --target (images alone)")
    p.add_argument("--oracle", default=None,
                   help="the judging ShapesOracle folder (default: the shipped one, which a pale background alone fools; "
                   "benchmarks/results/oracle_object judges the object)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `ipl adapt` options (not the shipped settings)")
    return p.parse_args(argv)


def heldout(backend, pipe, count):
    """``(inputs, source images (B,3,H,W) in [-1,1], reference factors)`` of the held-out set."""
    if backend == "diffae":
        images, factors = ShapesRenderer(pipe.image_size).sample(count, seed=EVAL_SEED, style="photo")
        return images, images, {"shape": factors.shape, "color": factors.color}
    z = torch.randn(count, pipe.source_generator.style_dim, generator=torch.Generator().manual_seed(EVAL_SEED))
    return z, None, None


def render(backend, pipe, inputs, source=False):
    """The (adapted or source) pipeline's images of the held-out inputs, ``[-1, 1]``."""
    if backend == "diffae":
        if source:  # the unadapted round trip: what the user's photo looks like before adapting
            z_sem, x_t0 = pipe.encode(inputs)
            return pipe.decode(z_sem, x_t0, unet=pipe.source_unet).cpu()
        return pipe(inputs, output_type="pt").images.cpu() * 2 - 1
    return pipe(latents=inputs, truncation=0.7, source=source, output_type="pt").images.cpu() * 2 - 1


def evaluate(oracle, backend, pipe, target, count):
    inputs, sources, factors = heldout(backend, pipe, count)
    before = render(backend, pipe, inputs, source=True)
    after = render(backend, pipe, inputs)
    if factors is None:  # generated images: the oracle's reading of the source image is the reference
        sources = before
        read = oracle.predict(before)
        factors = {"shape": read["shape"], "color": read["color"]}
    pred = oracle.predict(after)
    metrics = {
        "target_acc": float((pred["style"] == STYLES.index(target)).float().mean()),
        "shape_kept": float((pred["shape"] == factors["shape"]).float().mean()),
        "colour_kept": float((pred["color"] == factors["color"]).float().mean()),
        "source_target_acc": float((oracle.predict(before)["style"] == STYLES.index(target)).float().mean()),
    }
    rows = [sources[:8]] + ([before[:8]] if backend == "diffae" else []) + [after[:8]]
    labels = ["photo (held out)"] + (["DDIM round trip"] if backend == "diffae" else []) + [f"adapted: {target}"]
    if backend == "stylegan2":
        labels = ["source G_s(z)", f"adapted g_ema: {target}"]
    grid = labelled_grid(rows, labels, [str(i) for i in range(rows[0].shape[0])])
    return metrics, grid


def style_folder(target, count, folder):
    """``count`` rendered images of the ``target`` style (32 px PNG files) in ``folder``;
    returns them as ``(count, 3, 32, 32)`` in ``[-1, 1]``."""
    from ipl_diffusion.images import to_pil

    images, _ = ShapesRenderer(32).sample(count, seed=STYLE_SEED, style=target)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(to_pil(images)):
        image.save(folder / f"{target.replace(' ', '_')}_{i}.png")
    return images


def run_one(backend, target, seed, folder, extra, target_images=None, label=True):
    from ipl_diffusion.cli import main as ipl

    goal = (["--target", target] if label else []) + (["--target_images", str(target_images)] if target_images else [])
    argv = ["adapt", "--backend", backend, *goal, "--output_dir", str(folder), "--seed", str(seed), *extra]
    started = time.perf_counter()
    code = ipl(argv)
    seconds = time.perf_counter() - started
    if code:
        raise SystemExit(f"ipl {' '.join(argv)} exited with {code}")
    return seconds


def load(backend, folder):
    if backend == "stylegan2":
        from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline as cls
    else:
        from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline as cls
    pipe = cls.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def previous_results(path, extra, image_target, oracle=None):
    """Rows of an earlier run into the same folder with the same options and judge, else none.
    ``oracle``: the judging folder (None: the shipped one, as results from before the option)."""
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    same = record.get("extra") == extra and record.get("image_target") == image_target and record.get("oracle") == oracle
    return record["results"] if same else []


def table(results):
    lines = [
        "| backend | target | seeds | target acc. | shape kept | colour kept | seconds (2 cores) |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = {}
    for r in results:
        groups.setdefault((r["backend"], r["target"]), []).append(r)
    for (backend, target), rs in groups.items():
        mean = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        lines.append(
            f"| {backend} | {target} | {len(rs)} | {mean('target_acc'):.2f} | {mean('shape_kept'):.2f} | "
            f"{mean('colour_kept'):.2f} | {mean('seconds'):.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    import shutil

    args = parse_args(argv)
    out = Path(args.output_dir)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ipl-main-job-"))
    oracle = ShapesOracle.from_pretrained(str(args.oracle or default_model_path("oracle"))).eval()
    image_target = {"style_images": args.style_images, "label": not args.no_label} if args.style_images else None
    results = previous_results(out / "results.json", args.extra, image_target, args.oracle)
    done = {(r["backend"], r["target"], r["seed"]) for r in results}
    for backend in args.backends:
        for target in args.targets:
            for seed in args.seeds:
                if (backend, target, seed) in done:  # an interrupted measurement resumes
                    continue
                name = f"{backend}_{target.replace(' ', '_')}_seed{seed}"
                style = None
                if args.style_images:
                    name += f"_images{args.style_images}" + ("_nolabel" if args.no_label else "")
                    style = work / f"{name}_style"
                    shown = style_folder(target, args.style_images, style)
                    labelled_grid([shown], [f"target images: {target}"]).save(out / "grids" / f"{name}_style_images.png")
                seconds = run_one(backend, target, seed, work / name, args.extra, style, not args.no_label)
                with torch.no_grad():
                    metrics, grid = evaluate(oracle, backend, load(backend, work / name / "pipeline"), target, args.eval_images)
                grid.save(out / "grids" / f"{name}.png")
                row = {"backend": backend, "target": target, "seed": seed, "seconds": seconds, **metrics}
                results.append(row)
                print(json.dumps(row), flush=True)
                record = {"extra": args.extra, "image_target": image_target, "oracle": args.oracle,
                          "torch_threads": torch.get_num_threads(), "results": results}
                (out / "results.json").write_text(json.dumps(record, indent=1))
    (out / "table.md").write_text(table(results) + "\n")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    print(f"results and held-out grids in {out}")


if __name__ == "__main__":
    main()
