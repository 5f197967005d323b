"""World v2: the biased style/content sampler, the CLIP loss that lets a label absorb
content, and the pure pieces of benchmarks/shapes_worlds.py (oracle caption directions,
diagnostics, matched-accuracy interpolation, run keys)."""

import math
import os

import pytest
import torch

from ipl_diffusion.shapes import COLORS, SHAPES, STYLES, default_model_path
from ipl_diffusion.shapes.worlds import sample_world_factors, validate_style_bias, world_share
from repo_scripts import load_script


def test_biased_world_ties_target_styles_to_content_and_keeps_photos_balanced():
    factors = sample_world_factors(6000, bias=0.9, seed=3)
    # 0.9 + 0.1 / 6 of sketches are circles and red; neon blue; pixel art square; mosaic green.
    for style, factor, value in (("sketch", "shape", "circle"), ("sketch", "color", "red"), ("neon", "color", "blue"),
                                 ("pixel art", "shape", "square"), ("mosaic", "color", "green")):
        assert world_share(factors, style, factor, value) > 0.88, (style, factor)
    # The source style stays uniform, so the photo-trained generators still fit the world.
    photo = factors.style == STYLES.index("photo")
    for factor, names in (("shape", SHAPES), ("color", COLORS)):
        counts = torch.bincount(getattr(factors, factor)[photo], minlength=len(names)).float()
        assert counts.min() / counts.sum() > 0.12 and counts.max() / counts.sum() < 0.22
    # Styles stay uniform too.
    assert torch.bincount(factors.style, minlength=len(STYLES)).min() > 1000


def test_bias_zero_is_the_balanced_world():
    factors = sample_world_factors(6000, bias=0.0, seed=3)
    assert world_share(factors, "sketch", "shape", "circle") < 0.22


def test_style_bias_refuses_the_source_style_and_unknown_names():
    with pytest.raises(ValueError, match="source style"):
        validate_style_bias({"photo": {"shape": "circle"}})
    with pytest.raises(ValueError, match="unknown shape"):
        validate_style_bias({"sketch": {"shape": "hexagon"}})
    with pytest.raises(ValueError, match="shape or a color"):
        validate_style_bias({"sketch": {"size": "big"}})
    with pytest.raises(ValueError, match="bias must lie"):
        sample_world_factors(4, bias=1.5)


def test_paired_loss_weight_one_is_clips_standard_loss():
    """With weight 1 only an image's own caption is its positive (CLIP's diagonal targets): the
    loss then differs from the multi-positive one when captions are shared, and equals a hand
    cross-entropy with diagonal labels."""
    train_clip = load_script("examples/shapes/train_clip.py")
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    match = torch.ones(6, 6)  # every caption fits every image (e.g. all say "a sketch")
    scale = torch.tensor(math.log(10.0))
    multi = train_clip.multi_positive_clip_loss(img, txt, scale, match)
    paired = train_clip.multi_positive_clip_loss(img, txt, scale, match, paired_weight=1.0)
    logits = 10 * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T
    labels = torch.arange(6)
    expected = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(paired, expected, atol=1e-5)
    assert not torch.allclose(paired, multi, atol=1e-3)


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/shapes_worlds.py")


def test_interpolation_at_matched_accuracy(bench):
    points = [(0, 0.0, 1.0), (10, 0.4, 0.8), (20, 1.0, 0.2)]
    assert bench.interpolate_at(points, 0.7) == pytest.approx(0.5)
    assert bench.interpolate_at(points, 0.4) == pytest.approx(0.8)
    # A run that never gets there has no value (it is not counted as a zero).
    assert bench.interpolate_at([(0, 0.0, 1.0), (10, 0.3, 0.9)], 0.5) is None


def test_direction_diagnostics_tell_fixed_content_following_and_anti_aligned_directions(bench):
    g = torch.Generator().manual_seed(0)
    content = torch.nn.functional.normalize(torch.randn(16, 32, generator=g), dim=-1)
    src = torch.nn.functional.normalize(torch.randn(1, 32, generator=g), dim=-1).expand(16, 32)
    fixed = bench.direction_diagnostics(src, src + 0.5, content)
    assert fixed["dt_mean_pairwise_cos"] == pytest.approx(1.0, abs=1e-5)
    assert math.isnan(fixed["content_alignment"])
    toward = bench.direction_diagnostics(src, src + 0.5 + 0.3 * content, content)
    away = bench.direction_diagnostics(src, src + 0.5 - 0.3 * content, content)
    assert toward["content_alignment"] > 0.5 and away["content_alignment"] < -0.5
    assert toward["dt_mean_pairwise_cos"] < 1


def test_run_key_changes_with_models_and_run_options_only(bench):
    args = bench.parse_args([])
    key = bench.run_settings_key(args, {"clip": "a"})
    assert bench.run_settings_key(args, {"clip": "b"}) != key
    args.milestones = [5, 10]
    assert bench.run_settings_key(args, {"clip": "a"}) != key
    args2 = bench.parse_args(["--seeds", "7", "8"])
    assert bench.run_settings_key(args2, {"clip": "a"}) == key


def test_quick_never_writes_into_the_committed_results(bench):
    args = bench.parse_args(["--quick", "--output_dir", "benchmarks/results/shapes_worlds"])
    assert "benchmarks/results" not in args.output_dir.replace("\\", "/")


def test_object_on_another_styles_background():
    """Issue 18 item 6: a photo object on sketch paper keeps the photo render inside the object
    and is the empty sketch paper far from it."""
    from ipl_diffusion.shapes import ShapesRenderer, sample_factors

    renderer = ShapesRenderer(32)
    factors = sample_factors(6, seed=2, style="photo", shape="square")
    factors.position[:] = 0.5
    factors.size[:] = 0.2
    photo = renderer.render(factors, torch.Generator().manual_seed(0))
    swapped = renderer.render_on_background(factors, "sketch", torch.Generator().manual_seed(0))
    paper = renderer.render(factors.with_style("sketch"), torch.Generator().manual_seed(0))
    assert torch.allclose(swapped[:, :, 14:18, 14:18], photo[:, :, 14:18, 14:18], atol=1e-3)  # the object
    # Corners: sketch paper (near white), not the photo's tinted, shaded background.
    assert torch.allclose(swapped[:, :, :3, :3], paper[:, :, :3, :3], atol=0.05)
    assert (swapped[:, :, :3, :3] - photo[:, :, :3, :3]).abs().mean() > 0.1


def test_oracle_training_images_swap_backgrounds_but_not_labels():
    from ipl_diffusion.shapes import ShapesRenderer, sample_factors

    train_oracle = load_script("examples/shapes/train_oracle.py")
    renderer = ShapesRenderer(32)
    factors = sample_factors(8, seed=1)
    plain = train_oracle.training_images(renderer, factors, torch.Generator().manual_seed(0), 0.0)
    swapped = train_oracle.training_images(renderer, factors, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(plain, renderer.render(factors, torch.Generator().manual_seed(0)))
    # Every image's background changed (its corner), the factors (labels) were not touched.
    assert ((swapped[:, :, :2, :2] - plain[:, :, :2, :2]).abs().flatten(1).mean(1) > 0.02).all()
    assert torch.equal(factors.style, sample_factors(8, seed=1).style)


@pytest.mark.slow
def test_quick_benchmark_runs_every_scheme_and_resumes(bench, tmp_path):
    """Smoke test of the GAN gate on the shipped models: manual, oracle and adaptive runs,
    diagnostics and tables; a re-run adapts nothing (runs.csv is keyed and resumed)."""
    import csv

    text, rows = _quick_run(bench, tmp_path, "content alignment")
    assert {"learned - manual", "random - manual"} <= {line.split(" | ")[3] for line in text.splitlines() if " - manual" in line}
    assert (tmp_path / "grids" / "control_sketch.png").is_file()
    bench.main(["--quick", "--output_dir", str(tmp_path)])
    with open(tmp_path / "runs.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)


def test_grids_show_every_scheme_of_a_folder_filled_by_several_commands(bench, tmp_path):
    """The grid is drawn from runs.csv and the saved images, not from the last command's runs."""
    from PIL import Image

    bench.main(["--quick", "--schemes", "manual", "--output_dir", str(tmp_path)])
    bench.main(["--quick", "--schemes", "oracle", "manual", "--output_dir", str(tmp_path)])  # runs only the oracle
    rows = (tmp_path / "grids" / "control_sketch.txt").read_text()
    assert "manual@" in rows and "oracle@" in rows
    height = Image.open(tmp_path / "grids" / "control_sketch.png").height
    bench.main(["--quick", "--schemes", "manual", "oracle", "adaptive", "--output_dir", str(tmp_path)])
    assert Image.open(tmp_path / "grids" / "control_sketch.png").height > height  # one more row
    bench.main(["--quick", "--schemes", "oracle", "--output_dir", str(tmp_path)])  # runs nothing
    assert "manual@" not in (tmp_path / "grids" / "control_sketch.txt").read_text()  # the command's schemes


def _quick_run(bench, tmp_path, expected_heading, *options):
    """A --quick benchmark into tmp_path: its matched.md text and runs.csv rows, after checking
    that every default scheme ran and the tables name the schemes and ``expected_heading``."""
    import csv

    bench.main(["--quick", *options, "--output_dir", str(tmp_path)])
    text = (tmp_path / "matched.md").read_text()
    for name in ("manual (NADA)", "oracle (true captions)", "adaptive (IPL)", "oracle - manual", expected_heading):
        assert name in text
    with open(tmp_path / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["scheme"] for r in rows} == set(bench.DEFAULT_SCHEMES)
    return text, rows


@pytest.mark.slow
def test_quick_diffae_benchmark_runs_every_scheme_and_resumes(bench, tmp_path):
    """The DiffAE gate's smoke test: every scheme adapts the shipped Shapes DiffAE, the tables
    and the grid are written, and a re-run adapts nothing."""
    import csv
    import json

    text, rows = _quick_run(bench, tmp_path, "evaluation photos' z_sem", "--backend", "diffae")
    assert {int(r["iteration"]) for r in rows} == {0, 1, 2}  # --quick's milestones
    assert all(r["target_acc"] != "" for r in rows if int(r["iteration"]) > 0)
    assert (tmp_path / "grids" / "control_sketch.png").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["backend"] == "diffae" and "diffae_source_unet" in config["model_digests"]
    bench.main(["--quick", "--backend", "diffae", "--output_dir", str(tmp_path)])
    with open(tmp_path / "runs.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)


def test_diffae_oracle_directions_are_the_true_captions_of_each_training_photo(bench):
    """The DiffAE trainer of the oracle scheme is given, per training photo, the caption-table
    direction of the photo's true (renderer) content: computed here from the captions."""
    import torch.nn.functional as F

    from ipl_diffusion.shapes import ShapesRenderer, default_model_path

    args = bench.parse_args(["--backend", "diffae", "--train_images", "6", "--stage1_images", "16", "--milestones", "1"])
    backend = bench.make_backend(args, "cpu")
    encoder, image_features = bench.load_world_clip(default_model_path("clip"), "cpu")
    learner = bench.OracleCaptionPrompts(encoder, backend.content_reader(None))  # as the oracle scheme builds it
    prompts = backend.stage2_prompts(learner, "oracle", 3, args)
    trainer = backend.trainer(prompts, encoder, image_features, 3, 1e-4, args)
    _, factors = ShapesRenderer(32).sample(6, seed=3, style="photo")  # the seed's training photos
    content = list(zip(factors.shape.tolist(), factors.color.tolist()))
    i, j = 0, next(k for k in range(1, 6) if content[k] != content[0])

    def caption_features(style, shape, color):
        texts = [t.format(style=style, color=COLORS[color], shape=SHAPES[shape]) for t in bench.FULL_CAPTIONS]
        with torch.no_grad():
            return F.normalize(encoder.encode_text(texts).float(), dim=-1).mean(0)

    for k in (i, j):
        expected = caption_features("sketch", *content[k]) - caption_features("photo", *content[k])
        assert torch.allclose(trainer.tgt_text[k] - trainer.src_text[k], expected, atol=1e-5), content[k]
    assert not torch.allclose(trainer.tgt_text[i] - trainer.src_text[i], trainer.tgt_text[j] - trainer.src_text[j], atol=1e-4)


def test_the_committed_gan_results_keep_their_run_keys(bench):
    """Adding the DiffAE backend left the GAN's run key as it was: the committed GAN results'
    rows are still the current ones (not ignored as another key's)."""
    import json

    from repo_scripts import REPO

    config = json.loads((REPO / "benchmarks/results/shapes_worlds/config.json").read_text())
    args = bench.parse_args([])
    for name in ("target", "milestones", "batch_size", "stage1_iterations", "stage1_batch_size", "lambda_domain",
                 "eval_images", "diag_latents", "truncation"):
        setattr(args, name, config[name])
    for world, key in config["run_keys"].items():
        assert bench.run_settings_key(args, dict(config["model_digests"], clip=config["world_digests"][world])) == key
    assert bench.run_settings_key(bench.parse_args(["--backend", "diffae"]), {"clip": "a"}) != bench.run_settings_key(
        bench.parse_args([]), {"clip": "a"})


def test_an_output_folder_of_one_backend_is_refused_to_the_other(bench, tmp_path):
    (tmp_path / "config.json").write_text('{"target": "sketch"}')  # an older GAN config: no backend recorded
    bench.check_output_backend(tmp_path, bench.parse_args([]))
    with pytest.raises(ValueError, match="--backend stylegan2 results"):
        bench.check_output_backend(tmp_path, bench.parse_args(["--backend", "diffae"]))


def test_probability_kept_reads_the_oracle_probability_of_each_source_value(bench):
    from types import SimpleNamespace

    from ipl_diffusion.shapes import ShapesRenderer, default_model_path
    from ipl_diffusion.shapes.oracle import ShapesOracle

    oracle = ShapesOracle.from_pretrained(str(default_model_path("oracle"))).eval()
    images, factors = ShapesRenderer(32).sample(24, seed=3, style="photo")
    with torch.no_grad():
        logits = oracle(images)
    # Half the "source" values are wrong on purpose: what is kept is the source's value, not
    # whatever the oracle is most sure of.
    claimed = {"shape": factors.shape.clone(), "color": factors.color.clone()}
    claimed["shape"][:12] = (claimed["shape"][:12] + 1) % len(SHAPES)
    claimed["color"][:12] = (claimed["color"][:12] + 1) % len(COLORS)
    ev = dict(factors=SimpleNamespace(position=factors.position, size=factors.size, **claimed), spread=None)
    metrics = bench.score(oracle, images, ev, "sketch")
    for factor in ("shape", "color"):
        # independent: softmax of the raw logits, picked at each image's claimed source value
        expected = logits[factor].softmax(1)[torch.arange(24), claimed[factor]].mean()
        assert metrics[f"{factor}_prob_kept"] == pytest.approx(float(expected), abs=1e-5)


def test_an_older_runs_csv_is_rewritten_under_the_new_header_before_appending(bench, tmp_path):
    import csv

    path = tmp_path / "runs.csv"
    old_fields = [f for f in bench.FIELDS if not f.endswith("_prob_kept")]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=old_fields)
        writer.writeheader()
        writer.writerow({f: "1" for f in old_fields})
    writer = bench.RunsWriter(path, [])
    writer.write({f: "2" for f in bench.FIELDS})
    writer.close()
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0]["shape_prob_kept"] == "" and rows[0]["target_acc"] == "1"
    assert rows[1]["shape_prob_kept"] == "2" and rows[1]["target_acc"] == "2"


def test_style_only_captions_name_only_the_style_of_target_style_images():
    import random

    from ipl_diffusion.shapes import sample_factors
    from ipl_diffusion.shapes.vocab import sample_captions

    train_clip = load_script("examples/shapes/train_clip.py")
    factors = sample_factors(200, seed=0)
    captions, mentioned = sample_captions(factors, random.Random(0))
    new_captions, new_mentioned = train_clip.style_only_captions(factors, captions, mentioned, random.Random(1), 1.0)
    for i in range(len(factors)):
        if STYLES[int(factors.style[i])] == "photo":
            assert new_captions[i] == captions[i]  # the source style's captions are untouched
        else:
            assert new_mentioned[i] == {"style": int(factors.style[i])}
            assert STYLES[int(factors.style[i])] in new_captions[i]


def test_reporting_bias_leaves_only_the_usual_content_of_a_target_style_unsaid():
    import random
    import re

    from ipl_diffusion.shapes.vocab import sample_captions
    from ipl_diffusion.shapes.worlds import DEFAULT_STYLE_BIAS

    train_clip = load_script("examples/shapes/train_clip.py")
    factors = sample_world_factors(400, bias=0.9, seed=2)
    captions, mentioned = sample_captions(factors, random.Random(0))
    new_captions, new_mentioned = train_clip.reporting_bias_captions(factors, captions, mentioned, random.Random(1), 1.0)
    names = {"shape": SHAPES, "color": COLORS}
    dropped = 0
    for i in range(len(factors)):
        style = STYLES[int(factors.style[i])]
        usual = {f: names[f].index(v) for f, v in DEFAULT_STYLE_BIAS.get(style, {}).items()}
        was, now = mentioned[i], new_mentioned[i]
        if not any(was.get(f) == v for f, v in usual.items()):
            assert new_captions[i] == captions[i] and now == was  # photos and unusual content: as before
            continue
        dropped += 1
        assert now["style"] == int(factors.style[i]) and style in new_captions[i]
        for factor, value in was.items():
            if factor == "style":
                continue
            kept = usual.get(factor) != value  # what is unusual is still said, the usual unsaid
            said = re.search(rf"\b{names[factor][value]}\b", new_captions[i]) is not None  # not "embroiRED"
            assert (factor in now) == kept and said == kept
    assert dropped > 50


def test_train_clip_refuses_world_options_out_of_range(capsys):
    train_clip = load_script("examples/shapes/train_clip.py")
    for argv, message in ((["--faint_style_prob", "1.5"], "--faint_style_prob must lie in [0, 1]"),
                          (["--reporting_bias", "-0.1", "--bias", "0.9"], "--reporting_bias must lie in [0, 1]"),
                          (["--reporting_bias", "1"], "--reporting_bias needs --bias > 0")):
        with pytest.raises(SystemExit):
            train_clip.parse_args(argv)
        assert message in capsys.readouterr().err
    assert train_clip.parse_args(["--reporting_bias", "1", "--bias", "0.9", "--faint_style_prob", "0.5"]).reporting_bias == 1.0


def test_faint_styles_blend_each_target_style_image_towards_its_own_photo():
    from ipl_diffusion.shapes import ShapesRenderer, sample_factors

    train_clip = load_script("examples/shapes/train_clip.py")
    renderer, factors = ShapesRenderer(32), sample_factors(64, seed=3)
    full = renderer.render(factors, generator=torch.Generator().manual_seed(5))
    photos = renderer.render(factors.with_style("photo"), generator=torch.Generator().manual_seed(5))
    faint = train_clip.faint_styles(renderer, factors, torch.Generator().manual_seed(5), 1.0)
    is_photo = factors.style == STYLES.index("photo")
    assert torch.equal(faint[is_photo], full[is_photo])  # the source style is never blended
    # Every other image lies on the segment from its own photo (same object, same noise) to
    # its full-strength render, at one strength per image in (0, 1].
    step, span = (faint - photos)[~is_photo].flatten(1), (full - photos)[~is_photo].flatten(1)
    strength = (step * span).sum(1) / (span * span).sum(1)
    assert torch.allclose(step, strength[:, None] * span, atol=1e-5)
    assert bool((strength > 0).all() and (strength <= 1).all()) and float(strength.std()) > 0.1
    unchanged = train_clip.faint_styles(renderer, factors, torch.Generator().manual_seed(5), 0.0)
    assert torch.allclose(unchanged, full, atol=1e-6)


def test_shapes_collapse_quick_never_writes_into_the_committed_results():
    collapse = load_script("benchmarks/shapes_collapse.py")
    assert "benchmarks/results" not in collapse.parse_args(["--quick"]).output_dir.replace("\\", "/")
    assert collapse.parse_args(["--quick", "--output_dir", "/tmp/x"]).output_dir == "/tmp/x"


def _curve_rows(scheme, seed, shape_at_end):
    """Two milestones: accuracy 0.5 then 1.0; shape kept falls from 1 to ``shape_at_end``."""
    rows = []
    for iteration, acc, shape in ((10, 0.5, 1.0), (20, 1.0, shape_at_end)):
        row = dict(world="w", scheme=scheme, lr="0.001", seed=str(seed), iteration=str(iteration), target_acc=str(acc))
        for key, _, _ in load_script("benchmarks/shapes_worlds.py").CURVE_METRICS:
            row[key] = "1.0"
        row["shape_acc"] = str(shape)
        rows.append(row)
    return rows


def test_gate_passes_only_with_five_seeds_and_a_positive_interval(bench, tmp_path):
    args = bench.parse_args(["--match_acc", "0.75", "--schemes", "manual", "oracle"])
    source = {k: 1.0 for k, _, _ in bench.CURVE_METRICS}
    source["target_acc"] = 0.0

    def verdict(seeds):
        rows = []
        for seed in range(seeds):
            rows += _curve_rows("manual", seed, 0.5 + 0.01 * seed) + _curve_rows("oracle", seed, 0.7 + 0.01 * seed)
        bench.analyse(rows, args, source, tmp_path)
        line = [l for l in (tmp_path / "matched.md").read_text().splitlines() if "oracle - manual" in l][0]
        return line.rsplit("|", 3)[-3].strip()  # the gate as written (the last column is Holm's)

    # Oracle keeps 0.1 more shape at accuracy 0.75 in every seed.
    assert verdict(5) == "PASS"
    assert verdict(2).startswith("undecided")
    # every other scheme gets the Holm-corrected verdict too, but no gate (the gate is the oracle's)
    rows = []
    for seed in range(5):
        rows += _curve_rows("manual", seed, 0.5) + _curve_rows("adaptive", seed, 0.6 + 0.01 * seed)
    bench.analyse(rows, bench.parse_args(["--match_acc", "0.75", "--schemes", "manual", "adaptive"]), source, tmp_path)
    line = [l for l in (tmp_path / "matched.md").read_text().splitlines() if "adaptive - manual" in l][0]
    assert line.endswith("| – | PASS (p 0.00042, shape kept) |")  # +0.05 + 0.005 s: t = 17, 6 tests


def test_holm_gate_needs_a_difference_that_survives_the_family(bench):
    """One metric at p = 0.013 passes the gate as written; among 6 metrics at 2 levels it does
    not, and a difference far from 0 still does."""
    manual = {k: {s: 0.0 for s in range(5)} for k, _, _ in bench.CURVE_METRICS}

    def record(shape_diffs):
        oracle = {k: dict(v) for k, v in manual.items()}
        oracle["shape_acc"] = dict(enumerate(shape_diffs))
        rec = {}
        _, passes = bench.compare_to_manual(manual, oracle, rec)
        return rec, passes

    modest, passes = record([0.1, 0.2, 0.3, 0.4, 0.5])  # t = 4.24, df 4: p = 0.0132
    assert modest["shape_acc_p"] == pytest.approx(0.0132, abs=2e-4)
    assert modest["color_acc_p"] == 1.0  # no difference at all
    assert bench.gate_verdict(modest, passes) == "PASS"
    assert bench.holm_verdicts([modest]) == ["fail (p 0.079, shape kept)"]  # 6 tests: 6 x 0.0132
    strong, _ = record([0.30, 0.31, 0.32, 0.33, 0.34])  # t = 42: survives any family here
    verdicts = bench.holm_verdicts([modest, strong])
    assert verdicts[0] == "fail (p 0.15, shape kept)"  # the second smallest of 12 tests: 11 x 0.0132
    assert verdicts[1] == "PASS (p 1.7e-05, shape kept)"  # 12 x 1.4e-06
    few, _ = record([0.3, 0.31])
    assert bench.holm_verdicts([few])[0].startswith("undecided")


def test_a_resumed_run_replaces_its_interrupted_attempt(bench, tmp_path):
    """runs.csv keeps the rows of an attempt stopped before its last milestone; the resumed run
    appends a whole new attempt, which alone counts (the curves would count the seed twice)."""
    import csv

    def run(scheme, seed, iterations, shape):
        return [dict(key="k", world="w", scheme=scheme, lr="0.001", seed=str(seed), iteration=str(i),
                     target_acc=str(i / 20), shape_acc=str(shape)) for i in iterations]

    interrupted = run("oracle", 0, (0, 10), 0.1)
    rows = run("manual", 0, (0, 10, 20), 0.5) + interrupted + run("manual", 1, (0, 10, 20), 0.5) + run("oracle", 0, (0, 10, 20), 0.9)
    kept = bench.last_attempts(rows)
    assert [r for r in kept if r["scheme"] == "oracle"] == run("oracle", 0, (0, 10, 20), 0.9)
    assert len(kept) == len(rows) - len(interrupted)
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    current, done = bench.read_current_runs(path, {"w": "k"}, 20)
    assert len(current) == len(kept) and ("k", "w", "oracle", 0.001, 0) in done
    assert bench.last_attempts(interrupted) == interrupted  # an unfinished run's rows still count until redone


def test_equal_budget_differences_pair_each_seeds_last_iteration(bench):
    rows = []
    for seed in range(3):
        rows += _curve_rows("manual", seed, 0.5) + _curve_rows("oracle", seed, 0.6 + 0.1 * seed)
    for row in rows:
        row.update(drift_to_bias_shape="")
        row.pop("drift_to_bias_color", None)  # a runs.csv from before the column existed
    lines = bench.equal_budget_differences(rows, ["w"], [0.001])
    cells = [c.strip() for c in lines[-1].split("|")]
    # last iteration 20: shape kept 0.6 / 0.7 / 0.8 against 0.5 -> +0.2 (mean), accuracy equal
    assert cells[1:5] == ["w", "0.001", "oracle - manual", "20"]
    assert cells[5].startswith("+0.000") and cells[6].startswith("+0.200") and cells[6].endswith("(n=3)")
    assert cells[8] == cells[9] == "–"  # no biased content measured: not a number


def test_gate_skips_metrics_older_rows_do_not_have(bench, tmp_path):
    args = bench.parse_args(["--match_acc", "0.75", "--schemes", "manual", "oracle"])
    source = {k: 1.0 for k, _, _ in bench.CURVE_METRICS}
    source["target_acc"] = 0.0
    rows = []
    for seed in range(5):
        rows += _curve_rows("manual", seed, 0.5 + 0.01 * seed) + _curve_rows("oracle", seed, 0.7 + 0.01 * seed)
    for row in rows:  # runs.csv written before p(kept) existed: the upgraded header leaves it empty
        row["shape_prob_kept"] = row["color_prob_kept"] = ""
    bench.analyse(rows, args, source, tmp_path)
    line = [l for l in (tmp_path / "matched.md").read_text().splitlines() if "oracle - manual" in l][0]
    assert line.rsplit("|", 3)[-3].strip() == "PASS"


def _stage1_options(bench, args, schemes):
    """The Stage1Config that ``stage1_run`` hands the backend for each of ``schemes``."""
    from types import SimpleNamespace

    seen = []

    class Learner:
        heldout_retrieval = 0.5

        def text_features(self, w, label):
            return torch.randn(len(w), 8)

    backend = SimpleNamespace(stage1=lambda encoder, features, options, seed, args: seen.append(options) or Learner())
    diag = dict(w=torch.zeros(4, 2), c=torch.randn(4, 8))
    for scheme in schemes:
        bench.stage1_run(backend, None, None, None, scheme, 0, args, diag)
    return seen


def test_lambda_sweep_points_are_schemes_run_with_their_lambda_and_tabled_against_nada(bench, tmp_path):
    args = bench.parse_args(["--match_acc", "0.75", "--schemes", "manual", "adaptive", "adaptive@0", "adaptive@2.5"])
    for bad in (["--schemes", "manual@1"], ["--schemes", "adaptive@x"], ["--schemes", "adaptive@-1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    seen = _stage1_options(bench, args, ("adaptive", "adaptive@0", "adaptive@2.5"))
    assert [(o.scheme, o.lambda_domain) for o in seen] == [("adaptive", args.lambda_domain), ("adaptive", 0.0), ("adaptive", 2.5)]

    source = {k: 1.0 for k, _, _ in bench.CURVE_METRICS}
    source["target_acc"] = 0.0
    rows = []
    for seed in range(5):
        rows += _curve_rows("manual", seed, 0.5) + _curve_rows("adaptive@2.5", seed, 0.6)
    text = bench.analyse(rows, args, source, tmp_path)
    assert "adaptive (IPL), λ = 2.5" in text
    assert any(line.startswith("| w | 0.001 | 0.75 | adaptive@2.5 - manual | +0.050") for line in text.splitlines())


def test_direction_scheme_is_ipl_with_the_direction_regulariser_and_not_run_by_default(bench):
    assert "direction" not in bench.parse_args([]).schemes  # the paper's schemes and the oracle only
    args = bench.parse_args(["--schemes", "manual", "direction", "direction@0.5"])
    assert bench.scheme_label("direction@0.5") == "adaptive, direction regulariser, λ = 0.5"
    seen = _stage1_options(bench, args, ("adaptive", "direction", "direction@0.5"))
    assert [(o.scheme, o.domain_regularizer, o.lambda_domain) for o in seen] == [
        ("adaptive", "feature", args.lambda_domain), ("adaptive", "direction", args.lambda_domain), ("adaptive", "direction", 0.5)]


def test_curve_plots_draw_each_schemes_mean_points_without_matplotlib(bench, tmp_path, monkeypatch):
    """Without matplotlib (our machines) the PIL fallback still writes the curve plots, and the
    mean over seeds of each milestone is drawn where the axis mapping puts it, in its series' colour."""
    import sys

    from PIL import Image

    plots = load_script("benchmarks/line_plots.py")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    # (scheme, iteration) -> per seed (target acc, shape kept); the means are the points drawn.
    per_seed = {("manual", 10): [(0.1, 0.95), (0.3, 0.85)], ("manual", 20): [(0.6, 0.7), (0.6, 0.7)],
                ("oracle", 10): [(0.3, 0.5), (0.3, 0.5)], ("oracle", 20): [(0.8, 0.35), (1.0, 0.45)]}
    rows = []
    for world in ("control", "biased"):
        for (scheme, iteration), values in per_seed.items():
            for seed, (acc, shape) in enumerate(values):
                row = dict(world=world, scheme=scheme, lr="0.001", seed=str(seed), iteration=str(iteration), target_acc=str(acc))
                row.update({key: "0.5" for key, _, _ in bench.CURVE_METRICS}, shape_acc=str(shape), shape_prob_kept="")
                rows.append(row)
    (tmp_path / "plots").mkdir()
    bench.curve_plots(rows, bench.parse_args([]), tmp_path)

    assert not (tmp_path / "plots" / "curve_shape_prob_kept.png").exists()  # no row has the metric
    image = Image.open(tmp_path / "plots" / "curve_shape_acc.png").convert("RGB")
    expected = {"manual": [(0.2, 0.9), (0.6, 0.7)], "oracle": [(0.3, 0.5), (0.9, 0.4)]}
    y_low, y_high = plots.y_range({"panel": expected})
    for panel in (0, 1):  # control, then biased
        for colour, points in zip(plots.PALETTE, expected.values()):  # series in table order: manual, oracle
            for x, y in points:
                assert image.getpixel(plots.to_pixel(panel, x, y, y_low, y_high)) == colour, (panel, x, y)


def test_planted_content_adds_the_biased_content_at_the_asked_strength(bench):
    import torch.nn.functional as F

    eye = torch.eye(4)

    class Manual:  # NADA's fixed features: photo e0, sketch e1
        def text_features(self, latents, label):
            return eye[[0 if label == "photo" else 1] * len(latents)]

    planted = bench.PlantedContent(Manual(), eye[2], 1.0, "sketch")
    latents = torch.zeros(3, 2)
    dt = F.normalize(planted.text_features(latents, "sketch"), dim=-1) - F.normalize(planted.text_features(latents, "photo"), dim=-1)
    # tgt' = e1 + sqrt(2) e2: unit tgt' - e0 has cosine 1/sqrt(3) with e2
    assert F.cosine_similarity(dt, eye[2].expand_as(dt)).tolist() == pytest.approx([3 ** -0.5] * 3, abs=1e-6)
    assert torch.equal(planted.text_features(latents, "photo"), eye[[0] * 3])
    with pytest.raises(SystemExit):
        bench.parse_args(["--schemes", "content"])
    assert bench.scheme_label("content@0.5") == "NADA + planted content, α = 0.5"


def test_biased_content_direction_is_the_red_circle_caption_against_all_contents(bench):
    import torch.nn.functional as F

    encoder, _ = bench.load_world_clip(bench.default_model_path("clip"), "cpu")
    texts = [f"a {c} {s}" for s in SHAPES for c in COLORS]
    with torch.no_grad():
        feats = F.normalize(encoder.encode_text(texts).float(), dim=-1)
    expected = F.normalize(feats[texts.index("a red circle")] - feats.mean(0), dim=0)
    assert torch.allclose(bench.biased_content_direction(encoder, "sketch"), expected, atol=1e-5)
    with pytest.raises(ValueError, match="photo"):
        bench.biased_content_direction(encoder, "photo")


def test_train_clip_biased_world_options_end_to_end(tmp_path):
    """A tiny biased-world CLIP trains, records its world, and fine-tunes from its own folder."""
    import json

    train_clip = load_script("examples/shapes/train_clip.py")
    sizes = ["--width", "32", "--layers", "1", "--patch_size", "8", "--projection_dim", "16"]
    common = ["--batch_size", "16", "--max_steps", "2", "--warmup_steps", "1", "--eval_images", "40", "--eval_steps", "100",
              "--checkpointing_steps", "100"]
    first = tmp_path / "first"
    train_clip.main(sizes + common + ["--work_dir", str(tmp_path / "w1"), "--output_dir", str(first),
                                      "--bias", "0.9", "--paired_loss_weight", "1", "--style_only_prob", "0.5"])
    record = json.loads((first / "training_record.json").read_text())
    assert record["world"]["bias"] == 0.9 and record["world"]["style_bias"]["sketch"]["shape"] == "circle"
    assert set(record["zero_shot_accuracy"]["shape_per_style"]) == set(STYLES)
    second = tmp_path / "second"
    fine_tune = ["--work_dir", str(tmp_path / "w2"), "--output_dir", str(second), "--init_from", str(first)]
    with pytest.raises(SystemExit):  # a size next to --init_from would not change its model
        train_clip.parse_args(common + fine_tune + ["--width", "64"])
    train_clip.main(common + fine_tune)
    record = json.loads((second / "training_record.json").read_text())
    assert record["config"]["width"] == 32 and record["world"]["init_from"] == str(first)  # the sizes trained
    assert train_clip.parse_args([]).width == train_clip.MODEL_SIZES["width"]
    with pytest.warns(UserWarning, match="--warmup_steps 150 >= --max_steps 100: the learning rate never reaches"):
        train_clip.parse_args(["--max_steps", "100"])


def test_train_clip_lock_image_tower_trains_the_text_tower_only(tmp_path):
    """LiT: the image tower and its projection come out bit-identical to --init_from's, the text
    tower moves, and a locked fresh model is refused."""
    import json

    from safetensors.torch import load_file

    train_clip = load_script("examples/shapes/train_clip.py")
    sizes = ["--width", "32", "--layers", "1", "--patch_size", "8", "--projection_dim", "16"]
    common = ["--batch_size", "16", "--warmup_steps", "0", "--eval_images", "40", "--eval_steps", "100",
              "--checkpointing_steps", "100", "--bias", "0.9", "--paired_loss_weight", "1"]
    first, second = tmp_path / "first", tmp_path / "second"
    train_clip.main(sizes + common + ["--max_steps", "1", "--work_dir", str(tmp_path / "w1"), "--output_dir", str(first)])
    train_clip.main(common + ["--max_steps", "3", "--learning_rate", "1e-2", "--lock_image_tower",
                              "--init_from", str(first), "--work_dir", str(tmp_path / "w2"), "--output_dir", str(second)])
    before, after = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    image_side = [k for k in before if k.startswith(("vision_model.", "visual_projection."))]
    text_side = [k for k in before if k.startswith(("text_model.", "text_projection."))]
    assert image_side and text_side
    assert all(torch.equal(before[k], after[k]) for k in image_side)
    assert not all(torch.equal(before[k], after[k]) for k in text_side)
    assert json.loads((second / "training_record.json").read_text())["world"]["lock_image_tower"] is True
    with pytest.raises(SystemExit):
        train_clip.main(common + ["--max_steps", "1", "--lock_image_tower", "--work_dir", str(tmp_path / "w3"),
                                  "--output_dir", str(tmp_path / "third")])
    resume = ["--max_steps", "4", "--init_from", str(first), "--work_dir", str(tmp_path / "w2"), "--output_dir", str(tmp_path / "again")]
    with pytest.raises(ValueError, match="trained with --lock_image_tower True, not False; resume it with the same world"):
        train_clip.main(common + resume)
    with pytest.raises(ValueError, match="trained with --bias 0.9, not 0.5"):
        train_clip.main(common + resume + ["--lock_image_tower", "--bias", "0.5"])
    assert not (tmp_path / "again").exists()
    with pytest.raises(SystemExit):  # the trained CLIP would overwrite its own start
        train_clip.parse_args(common + ["--init_from", str(first), "--output_dir", str(first)])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((first / "config.json").read_text())
    (tmp_path / "broken" / "model.safetensors").write_bytes((first / "model.safetensors").read_bytes()[:100])
    for folder, message in ((tmp_path / "nowhere", "no CLIP folder there"), (tmp_path / "broken", "cannot load its CLIP")):
        with pytest.raises(ValueError, match=message):
            train_clip.main(common + ["--max_steps", "1", "--init_from", str(folder), "--work_dir", str(tmp_path / "w4"),
                                      "--output_dir", str(tmp_path / "fourth")])


def test_usual_content_photos_swap_only_the_usual_content_for_its_photo():
    """--usual_content_photo_prob: a red circle sketch (a blue neon, ...) becomes the photo of the
    same object; every other image is rendered as it would be without the option."""
    from ipl_diffusion.shapes import ShapesRenderer

    train_clip = load_script("examples/shapes/train_clip.py")
    factors = sample_world_factors(400, bias=0.9, generator=torch.Generator().manual_seed(0))
    usual = train_clip.shows_usual_content(factors)
    rules = {"sketch": (factors.color == COLORS.index("red")) & (factors.shape == SHAPES.index("circle")),
             "neon": factors.color == COLORS.index("blue"), "pixel art": factors.shape == SHAPES.index("square"),
             "mosaic": factors.color == COLORS.index("green"), "photo": torch.zeros(len(factors), dtype=torch.bool)}
    for style, rule in rules.items():
        in_style = factors.style == STYLES.index(style)
        assert torch.equal(usual[in_style], rule[in_style]) and (style == "photo" or usual[in_style].any()), style
    is_sketch = factors.style == STYLES.index("sketch")
    renderer = ShapesRenderer(32)
    swapped = train_clip.usual_content_photos(renderer, factors, torch.Generator().manual_seed(1), 1.0)
    photos = renderer.render(factors.with_style("photo"), generator=torch.Generator().manual_seed(1))
    styled = renderer.render(factors, generator=torch.Generator().manual_seed(1))
    assert torch.equal(swapped[usual], photos[usual]) and torch.equal(swapped[~usual], styled[~usual])
    unchanged = train_clip.usual_content_photos(renderer, factors, torch.Generator().manual_seed(1), 0.0)
    assert torch.equal(unchanged, styled)
    only_sketch = train_clip.shows_usual_content(factors, ["sketch"])
    assert torch.equal(only_sketch, usual & is_sketch) and (usual & ~is_sketch).any()
    with pytest.raises(SystemExit):
        train_clip.parse_args(["--usual_content_photo_prob", "0.5"])  # needs --bias
    for bad in (["--usual_content_styles", "photo"], ["--faint_style_prob", "0.5"]):
        with pytest.raises(SystemExit):
            train_clip.parse_args(["--bias", "0.9", "--usual_content_photo_prob", "0.5"] + bad)
    with pytest.raises(SystemExit):
        train_clip.parse_args(["--bias", "0.9", "--usual_content_styles", "sketch"])  # without the probability


def test_train_oracle_with_background_swaps_records_the_swap_matrix(tmp_path):
    import json

    train_oracle = load_script("examples/shapes/train_oracle.py")
    out = tmp_path / "oracle"
    train_oracle.main(["--work_dir", str(tmp_path / "w"), "--output_dir", str(out), "--batch_size", "8", "--max_steps", "1",
                       "--eval_images", "20", "--background_swap_prob", "0.5"])
    matrix = json.loads((out / "training_record.json").read_text())["evaluation"]["background_swap_style_accuracy"]
    assert set(matrix) == set(STYLES) and all(set(row) == set(STYLES) for row in matrix.values())


def test_world_pull_table_marks_a_clip_without_training_record_unknown_and_names_folders_by_path(tmp_path, capsys):
    """A CLIP folder without training_record.json is not shown as the balanced world; two CLIPs of
    the same folder name stay apart; a folder that is not a CLIP is one line, not a traceback."""
    import shutil

    pull_script = load_script("benchmarks/shapes_worlds_pull.py")
    shipped = default_model_path("clip")
    shutil.copytree(shipped, tmp_path / "copy" / "clip", ignore=shutil.ignore_patterns("training_record.json"))
    pull_script.main([str(shipped), str(tmp_path / "copy" / "clip"), "--output_dir", str(tmp_path / "out")])
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in (tmp_path / "out" / "world_sweep.md").read_text().splitlines()[2:]}
    assert set(rows) == {os.path.relpath(shipped), str(tmp_path / "copy" / "clip")}
    assert rows[os.path.relpath(shipped)][:2] == ["0.000", "0.000"]  # its record: the balanced world
    assert rows[str(tmp_path / "copy" / "clip")][:10] == ["?"] * 10 and rows[str(tmp_path / "copy" / "clip")][10] != "?"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        pull_script.main([str(tmp_path / "nowhere")])
    assert "nowhere: not a CLIP folder" in capsys.readouterr().err


def test_world_pull_of_planted_content_matches_nada_at_zero_and_rewards_content_above(bench):
    """shapes_worlds_pull's calibration: content@0 is NADA's direction, and planting the biased
    content makes a content-only change (photo -> red circle photo) pay."""
    pull_script = load_script("benchmarks/shapes_worlds_pull.py")
    encoder, image_features = bench.load_world_clip(str(bench.default_model_path("clip")), "cpu")
    scenes = pull_script.render_scenes()
    result = pull_script.pull(encoder, image_features, scenes, planted=(0.0, 1.0))
    for measure in ("cos_keep", "cos_biased", "cos_content", "prefer_biased"):
        assert result[f"content@0_{measure}"] == pytest.approx(result[f"nada_{measure}"], abs=1e-5)
    assert result["nada_cos_content"] < 0.1 < 0.4 < result["content@1_cos_content"]
    assert result["content@1_prefer_biased"] > 0.5 > result["nada_prefer_biased"]


def _benchmark_folder(folder, world, leads):
    """A shapes_worlds.py output folder of one world: per seed, NADA's and the oracle's curves,
    the oracle keeping ``leads[seed]`` more shape than NADA at the end (accuracy 1.0)."""
    import csv
    import json

    bench = load_script("benchmarks/shapes_worlds.py")
    folder.mkdir()
    source = {k: 1.0 for k, _, _ in bench.CURVE_METRICS}
    source["target_acc"] = 0.0
    (folder / "config.json").write_text(json.dumps({"run_keys": {world: "k1"}, "source_metrics": source}))
    rows = []
    for seed, lead in enumerate(leads):
        rows += _curve_rows("manual", seed, 0.5) + _curve_rows("oracle", seed, 0.5 + lead)
    rows += [dict(r, key="old", shape_acc="0.0") for r in _curve_rows("oracle", 0, 0.5)]  # another key: ignored
    for row in rows:
        row.setdefault("key", "k1")
        row["world"] = world
    with open(folder / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_twin_gate_subtracts_the_content_free_twins_lead_seed_by_seed(tmp_path):
    """shapes_worlds_twin.py: (oracle - NADA) in the world minus the same in the twin, per seed.
    A lead the twin shares is no evidence of the label's content."""
    twin_script = load_script("benchmarks/shapes_worlds_twin.py")
    _benchmark_folder(tmp_path / "world", "lit_Q", [0.2] * 5)
    _benchmark_folder(tmp_path / "twin", "lit_O", [0.05 + 0.01 * s for s in range(5)])
    _benchmark_folder(tmp_path / "same", "lit_S", [0.2] * 5)
    _, world = twin_script.folder_curves(tmp_path / "world", [0.75])
    _, twin = twin_script.folder_curves(tmp_path / "twin", [0.75])
    record, passes = twin_script.twin_difference(world, twin, "oracle", 0.75)
    # at accuracy 0.75, halfway between the milestones: leads 0.1 and 0.025 + 0.005 s
    assert record["shape_acc_n"] == 5 and record["shape_acc"] == pytest.approx(0.065)
    assert record["color_acc"] == 0.0 and passes[0] is True
    line = twin_script.twin_table(tmp_path / "world", tmp_path / "twin", [0.75])[-1]
    assert line.startswith("| 0.75 | oracle (true captions) | +0.065 ± ") and "| PASS | PASS (p " in line
    # the world's own lead alone passes the plain gate, but a twin with the same lead cancels it
    assert twin_script.twin_table(tmp_path / "world", tmp_path / "same", [0.75])[-1].endswith("| fail | fail (p 1) |")
    with pytest.raises(SystemExit, match="not a shapes_worlds.py output folder"):
        twin_script.folder_curves(tmp_path / "nowhere", [0.75])
    with pytest.raises(SystemExit):  # a folder against itself: 0 by construction
        twin_script.main(["--world", str(tmp_path / "world"), "--twin", str(tmp_path / "world")])
    assert twin_script.difference_cell(0.066, 0.0, 1) == "+0.066, no interval (n=1)"


def test_twin_script_refuses_what_it_cannot_pair(tmp_path, capsys):
    """Folders run with other settings, accuracies outside (0, 1], an --output in no folder;
    a repeated level is read once (it would enlarge the Holm family with copies)."""
    import json

    twin_script = load_script("benchmarks/shapes_worlds_twin.py")
    _benchmark_folder(tmp_path / "world", "lit_Q", [0.2] * 5)
    _benchmark_folder(tmp_path / "twin", "lit_O", [0.05 + 0.01 * s for s in range(5)])
    pair = ["--world", str(tmp_path / "world"), "--twin", str(tmp_path / "twin")]
    for bad in (["--match_acc", "2"], ["--match_acc", "0"], ["--output", str(tmp_path / "no" / "t.md")], ["--output", str(tmp_path)]):
        with pytest.raises(SystemExit):
            twin_script.main(pair + bad)
        assert "--match_acc takes target accuracies in (0, 1]" in capsys.readouterr().err or "--output" in bad
    twin_script.main(pair + ["--match_acc", "0.75", "0.75", "--output", str(tmp_path / "t.md")])
    rows = [line for line in (tmp_path / "t.md").read_text().splitlines() if line.startswith("| 0.75 |")]
    assert len(rows) == 1 and "| PASS | PASS (p " in rows[0]
    config = json.loads((tmp_path / "twin" / "config.json").read_text())
    (tmp_path / "twin" / "config.json").write_text(json.dumps({**config, "learning_rates": [0.004]}))
    (tmp_path / "world" / "config.json").write_text(json.dumps({**config, "learning_rates": [0.002]}))
    with pytest.raises(SystemExit, match=r"different settings \(learning_rates\)"):
        twin_script.main(pair)
