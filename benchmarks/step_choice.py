#!/usr/bin/env python
"""Is the automatic step choice at least as good as the last step? Judged on the Shapes world.

For every backend and seed this runs what a user runs, ``ipl adapt [--backend B] --target T
--seed S --candidate_steps N --keep_candidates`` (plus ``--extra`` options, e.g. more
``--iterations`` to overshoot), and judges **every** kept candidate -- the chosen one and the
last step among them -- on the 32 held-out images of ``benchmarks/main_job.py`` (DiffAE:
photos rendered with seed 31337, translated; StyleGAN2: fixed ``z`` of seed 31337, truncation
0.7) with the Shapes oracle: target-style accuracy, shape kept, colour kept, and
``faithful``, the fraction of images that are all three at once (the target style with the
source's shape and colour: one number for "a translation", since a run can raise the style
accuracy by destroying the content). The candidates' CLIP scores come from the run's
``step_choice.json`` (they are measured on other held-out sources than the oracle's).

Writes ``--output_dir/results.json`` (every candidate's oracle numbers and CLIP scores),
``table.md`` (picked vs last per run) and, per run, a labelled grid of 8 held-out images with
one row per candidate (``grids/``) -- look at them.

Usage::

    python benchmarks/step_choice.py --backends diffae --seeds 0 1 2 --candidate_steps 5
    python benchmarks/step_choice.py --backends diffae --seeds 0 1 2 --candidate_steps 10 --extra --iterations 90
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from benchmarks.main_job import EVAL_SEED, heldout, load, render, run_one  # noqa: E402
from ipl_diffusion.grids import labelled_grid  # noqa: E402
from ipl_diffusion.shapes import STYLES, default_model_path  # noqa: E402
from ipl_diffusion.shapes.oracle import ShapesOracle  # noqa: E402

METRICS = ("target_acc", "shape_kept", "colour_kept", "faithful")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["diffae"], choices=("diffae", "stylegan2"))
    p.add_argument("--target", default="sketch")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--candidate_steps", type=int, default=5)
    p.add_argument("--eval_images", type=int, default=32)
    p.add_argument("--output_dir", default="benchmarks/results/step_choice")
    p.add_argument("--work_dir", default=None, help="where the runs go (default: a temporary folder, removed)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `ipl adapt` options")
    return p.parse_args(argv)


def oracle_numbers(oracle, pred, factors, target):
    style = pred["style"] == STYLES.index(target)
    shape, colour = pred["shape"] == factors["shape"], pred["color"] == factors["color"]
    return {"target_acc": float(style.float().mean()), "shape_kept": float(shape.float().mean()),
            "colour_kept": float(colour.float().mean()), "faithful": float((style & shape & colour).float().mean())}


def swap_in(backend, pipe, folder):
    """Put a candidate's weights (``candidates/step-N``, save_pretrained) into the pipeline."""
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    module = pipe.unet if backend == "diffae" else pipe.generator
    module.load_state_dict(load_file(str(folder / SAFETENSORS_WEIGHTS_NAME)))


@torch.no_grad()
def judge_run(oracle, backend, run_dir, target, count):
    """Oracle numbers of every candidate of one run, and a grid (one row per candidate)."""
    choice = json.loads((run_dir / "step_choice.json").read_text())
    pipe = load(backend, run_dir / "pipeline")
    inputs, sources, factors = heldout(backend, pipe, count)
    before = render(backend, pipe, inputs, source=True)
    if factors is None:  # generated images: the oracle's reading of the source image is the reference
        sources, read = before, oracle.predict(before)
        factors = {"shape": read["shape"], "color": read["color"]}
    rows, labels, per_step = [sources[:8]], ["source (held out)"], []
    for candidate in choice["candidates"]:
        step = candidate["step"]
        swap_in(backend, pipe, run_dir / "candidates" / f"step-{step:06d}")
        after = render(backend, pipe, inputs)
        numbers = oracle_numbers(oracle, oracle.predict(after), factors, target)
        per_step.append({**candidate, **numbers, "chosen": step == choice["chosen_step"]})
        rows.append(after[:8])
        labels.append(f"step {step}" + (" (chosen)" if step == choice["chosen_step"] else ""))
    grid = labelled_grid(rows, labels, [str(i) for i in range(rows[0].shape[0])])
    return choice, per_step, grid


def table(results):
    lines = ["| backend | seed | extra | chosen / last step | target acc. (chosen / last) | shape kept | colour kept | faithful |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        chosen = next(c for c in r["candidates"] if c["chosen"])
        last = r["candidates"][-1]
        cells = " | ".join(f"{chosen[m]:.2f} / {last[m]:.2f}" for m in METRICS)
        lines.append(f"| {r['backend']} | {r['seed']} | {' '.join(r['extra']) or '-'} | {chosen['step']} / {last['step']} | {cells} |")
    means = {m: [sum(c[m] for c in r["candidates"] if c["chosen"]) for r in results] for m in METRICS}
    lasts = {m: [r["candidates"][-1][m] for r in results] for m in METRICS}
    n = max(len(results), 1)
    lines.append("| mean | | | | " + " | ".join(f"{sum(means[m]) / n:.2f} / {sum(lasts[m]) / n:.2f}" for m in METRICS) + " |")
    return "\n".join(lines)


def main(argv=None):
    import shutil

    args = parse_args(argv)
    out = Path(args.output_dir)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ipl-step-choice-"))
    oracle = ShapesOracle.from_pretrained(str(default_model_path("oracle"))).eval()
    results = []
    if (out / "results.json").is_file():  # an interrupted measurement resumes
        results = json.loads((out / "results.json").read_text())["results"]
    for backend in args.backends:
        for seed in args.seeds:
            if any(r["backend"] == backend and r["seed"] == seed and r["extra"] == args.extra for r in results):
                continue
            name = f"{backend}_{args.target.replace(' ', '_')}_seed{seed}" + ("_" + "_".join(args.extra) if args.extra else "")
            extra = ["--candidate_steps", str(args.candidate_steps), "--keep_candidates", *args.extra]
            seconds = run_one(backend, args.target, seed, work / name, extra)
            choice, per_step, grid = judge_run(oracle, backend, work / name, args.target, args.eval_images)
            grid.save(out / "grids" / f"{name}.png")
            row = {"backend": backend, "seed": seed, "extra": args.extra, "seconds": seconds,
                   "chosen_step": choice["chosen_step"], "candidates": per_step}
            results.append(row)
            print(json.dumps({k: row[k] for k in ("backend", "seed", "chosen_step")}), flush=True)
            for c in per_step:
                print("  " + " ".join(f"{k}={c[k]:.3f}" if isinstance(c[k], float) else f"{k}={c[k]}" for k in c), flush=True)
            (out / "results.json").write_text(json.dumps({"eval_seed": EVAL_SEED, "results": results}, indent=1))
    (out / "table.md").write_text(table(results) + "\n")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))


if __name__ == "__main__":
    main()
