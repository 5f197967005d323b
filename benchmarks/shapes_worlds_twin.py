#!/usr/bin/env python
"""Is a world's gate result its label's content? The oracle's lead over NADA in a world, minus
the same lead in its content-free twin.

``shapes_worlds.py``'s gate compares the true-caption oracle with NADA at matched target
accuracy. True captions name each image's colour and shape, which can hold those a little
better whatever the label carries, so a world can pass the gate without any content in its
label (lit_O does). What the label's content adds is the difference from a *twin*: a CLIP
trained identically without the content mechanism. Per matched accuracy, metric and seed::

    (scheme - manual in the world) - (scheme - manual in the twin)

as mean +- 95% t-interval over the seeds present in all four runs (a seed fixes the source
generator's evaluation latents and the Stage-2 draws in both folders, so the pairing holds).
The verdict is the gate's (``shapes_worlds.gate_verdict``): PASS when some gate metric's
interval lies above 0 and none below, from at least 5 seeds. The last column is the same
verdict corrected for the multiplicity: one family per scheme, the paired t-tests of the 6 gate
metrics (shape / colour kept, p(shape / colour kept), shape / colour entropy) at every
``--match_acc`` level, 24 tests at the default 4 levels, adjusted by Holm's step-down method
(``shapes_worlds.holm_verdicts``); it names the smallest adjusted p and its metric. The drift
metrics and the feature spread are reported, not tested. The two folders must have been run
with the same settings but the world (``PAIRED_SETTINGS``). For the drift metrics
("→ biased shape / colour", lower is better) a negative difference means less drift towards
the world's content than the twin's baseline.

    python benchmarks/shapes_worlds_twin.py --world benchmarks/results/shapes_worlds_lr0.004_800_lit_Q \\
        --twin benchmarks/results/shapes_worlds_lr0.004_800_lit_O \\
        --output benchmarks/results/shapes_worlds_lr0.004_800_lit_Q/twin_lit_O.md
"""

import argparse
import csv
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import shapes_worlds as sw  # noqa: E402

from ipl_diffusion.outputs import atomic_write_text  # noqa: E402


# config.json entries that must agree for two folders to be paired seed by seed: everything that
# shapes a run except the world's CLIP (the source model's and the oracle's digests included).
PAIRED_SETTINGS = ("backend", "target", "learning_rates", "milestones", "batch_size", "stage1_iterations",
                   "stage1_batch_size", "lambda_domain", "train_images", "stage1_images", "eval_images",
                   "diag_latents", "truncation", "model_digests", "source_metrics")


def read_config(folder):
    """A shapes_worlds.py output folder's config.json; SystemExit where it is not such a folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "runs.csv").is_file():
        raise SystemExit(f"{folder}: not a shapes_worlds.py output folder (config.json and runs.csv expected)")
    return json.loads((folder / "config.json").read_text())


def check_pairable(world_dir, twin_dir):
    """SystemExit naming the settings in which the two folders' runs differ (a seed pairs two runs
    only where nothing but the world's CLIP differs)."""
    world, twin = read_config(world_dir), read_config(twin_dir)
    differ = [key for key in PAIRED_SETTINGS if key in world and key in twin and world[key] != twin[key]]
    if differ:
        raise SystemExit(f"{world_dir} and {twin_dir} were run with different settings ({', '.join(differ)}); "
                         "a twin comparison pairs runs that differ only in the world's CLIP")


def folder_curves(folder, match_acc):
    """``(world, {(scheme, acc): {metric: {seed: value}}})`` of one shapes_worlds.py output folder:
    its runs of the recorded keys, read at each matched accuracy. One world and one learning rate
    per folder (a twin comparison pairs two such folders)."""
    folder = Path(folder)
    config = read_config(folder)
    keys = set(config["run_keys"].values())
    with open(folder / "runs.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r["key"] in keys and int(r["iteration"]) > 0]
    worlds, lrs = {r["world"] for r in rows}, {float(r["lr"]) for r in rows}
    if len(worlds) != 1 or len(lrs) != 1:
        raise SystemExit(f"{folder}: holds worlds {sorted(worlds)} at lr {sorted(lrs)}; a twin comparison needs one of each")
    matched = sw.matched_values(rows, SimpleNamespace(match_acc=match_acc), config["source_metrics"])
    return worlds.pop(), {(scheme, acc): values for (_, scheme, _, acc), values in matched.items()}


def scheme_gap(curves, scheme, acc):
    """``{metric: {seed: scheme - manual}}`` at matched accuracy ``acc`` (None where either run
    never reached it); None where the folder lacks the scheme."""
    other, base = curves.get((scheme, acc)), curves.get(("manual", acc))
    if other is None or base is None:
        return None
    return {key: {s: None if None in (other[key].get(s), base[key][s]) else other[key][s] - base[key][s] for s in base[key]}
            for key, _, _ in sw.CURVE_METRICS}


def twin_difference(world, twin, scheme, acc):
    """The gate record of ``scheme`` at matched accuracy ``acc``: per metric the mean, interval
    and seed count of the world's ``scheme - manual`` minus the twin's (``shapes_worlds.
    compare_to_manual`` pairs them seed by seed); None where a folder lacks the scheme.
    Returns ``(record, passes)`` as ``compare_to_manual`` does."""
    world_gap, twin_gap = scheme_gap(world, scheme, acc), scheme_gap(twin, scheme, acc)
    if world_gap is None or twin_gap is None:
        return None, []
    record = {}
    _, passes = sw.compare_to_manual(twin_gap, world_gap, record)
    return record, passes


def difference_cell(mean, half, n):
    """A table cell: mean ± 95% half-width (n=seeds); one seed has no interval to give."""
    if n == 0:
        return "–"
    return f"{mean:+.3f} ± {half:.3f} (n={n})" if n >= 2 else f"{mean:+.3f}, no interval (n=1)"


def twin_table(world_dir, twin_dir, match_acc):
    """Markdown lines: per scheme and matched accuracy, the world-minus-twin differences, the
    verdict, and the verdict Holm-corrected over that scheme's gate metrics at every level."""
    check_pairable(world_dir, twin_dir)
    world_name, world = folder_curves(world_dir, match_acc)
    twin_name, twin = folder_curves(twin_dir, match_acc)
    lines = [f"### {world_name} minus its twin {twin_name}: (scheme − NADA) in the world − the same in the twin", "",
             "| target acc | scheme | " + " | ".join(label for _, label, _ in sw.CURVE_METRICS) + " | verdict | verdict, Holm (6 gate metrics × levels) |",
             "|" + "---|" * (4 + len(sw.CURVE_METRICS))]
    schemes = [s for s in sw.schemes_in({k[0] for k in world} & {k[0] for k in twin}) if s != "manual"]
    rows = {}
    for scheme in schemes:
        found = [(acc, *twin_difference(world, twin, scheme, acc)) for acc in match_acc]
        found = [(acc, record, passes) for acc, record, passes in found if record is not None]
        holm = sw.holm_verdicts([record for _, record, _ in found])
        for (acc, record, passes), corrected in zip(found, holm):
            rows[(acc, scheme)] = (record, sw.gate_verdict(record, passes), corrected)
    for acc in match_acc:
        for scheme in schemes:
            if (acc, scheme) not in rows:
                continue
            record, verdict, corrected = rows[(acc, scheme)]
            cells = [difference_cell(record[k], record[k + "_ci95"], record[k + "_n"]) for k, _, _ in sw.CURVE_METRICS]
            lines.append(f"| {acc:g} | {sw.scheme_label(scheme)} | " + " | ".join(cells) + f" | {verdict} | {corrected} |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True, help="shapes_worlds.py output folder of the world whose label carries content")
    p.add_argument("--twin", required=True, help="the same benchmark's folder of its content-free twin")
    p.add_argument("--match_acc", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5],
                   help="the target accuracies at which both folders' curves are read (as shapes_worlds.py --match_acc)")
    p.add_argument("--output", default=None, help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if Path(args.world).resolve() == Path(args.twin).resolve():
        p.error("--world and --twin are the same folder: the difference would be 0 by construction")
    args.match_acc = sw.matched_accuracies(p, args.match_acc)
    if args.output and (Path(args.output).is_dir() or not Path(args.output).resolve().parent.is_dir()):
        p.error(f"--output {args.output}: give a markdown file in an existing folder")
    text = "\n".join(twin_table(args.world, args.twin, args.match_acc)) + "\n"
    if args.output:
        atomic_write_text(args.output, text)
    print(text)


if __name__ == "__main__":
    main()
