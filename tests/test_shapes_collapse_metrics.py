"""The mode-collapse benchmark's metrics, checked against hand computations and clean renders."""

import csv
import math

import pytest
import torch

from ipl_diffusion.shapes import SHAPES, STYLES, ShapesRenderer
from repo_scripts import load_script

bench = load_script("benchmarks/shapes_collapse.py")


def test_entropy_matches_hand_values():
    assert bench.entropy(torch.tensor([0, 1, 2, 3]), 6) == pytest.approx(math.log(4))
    assert bench.entropy(torch.tensor([2, 2, 2]), 6) == pytest.approx(0.0)
    p = torch.tensor([0.75, 0.25])
    assert bench.entropy(torch.tensor([0, 0, 0, 1]), 2) == pytest.approx(float(-(p * p.log()).sum()))


def test_summary_is_mean_and_t_interval():
    mean, half = bench.summarise([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(4.303 * 1.0 / math.sqrt(3))  # sd = 1, n = 3, t_{0.975, 2} = 4.303
    assert bench.summarise([5.0]) == (5.0, 0.0)


def test_t_p_value_matches_the_published_quantiles():
    """Two-sided p at the tabled 95% quantiles is 0.05 for every df, odd and even."""
    for df, t in bench._T95.items():
        assert bench.t_two_sided_p(t, df) == pytest.approx(0.05, abs=1e-4)
        assert bench.t_two_sided_p(-t, df) == bench.t_two_sided_p(t, df)
    assert bench.t_two_sided_p(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| > 1) = 1/2
    assert bench.t_two_sided_p(0.0, 4) == pytest.approx(1.0)
    assert bench.t_two_sided_p(4.604, 4) == pytest.approx(0.01, abs=1e-4)  # t_{0.995, 4}
    with pytest.raises(ValueError, match="positive integer"):
        bench.t_two_sided_p(1.0, 0)


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 -> 4 * 0.01, 3 * 0.03, max(0.09, 2 * 0.04), 0.5
    assert bench.holm_adjust([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert bench.holm_adjust([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    assert bench.holm_adjust([]) == []


def test_pairwise_distance_excludes_the_diagonal():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert bench.mean_pairwise_distance(feats) == pytest.approx(5.0)


def test_collapsed_images_score_low_diversity_and_preservation():
    """A perfect translation keeps every factor; a collapsed one (one image for all) does not."""
    from ipl_diffusion.shapes import default_model_path
    from ipl_diffusion.shapes.oracle import ShapesOracle

    oracle = ShapesOracle.from_pretrained(default_model_path("oracle")).eval()
    renderer = ShapesRenderer(32)
    photos, factors = renderer.sample(48, seed=77, style="photo")
    sketches = renderer(factors.with_style("sketch"), seed=77)
    reference = bench.mean_pairwise_distance(oracle.predict(photos)["features"])
    good = bench.evaluate_images(oracle, sketches, factors, STYLES.index("sketch"), 32, reference)
    collapsed = bench.evaluate_images(oracle, sketches[:1].expand_as(sketches), factors, STYLES.index("sketch"), 32, reference)
    assert good["target_acc"] > 0.9 and good["shape_acc"] > 0.8 and good["color_acc"] > 0.9
    assert good["shape_entropy"] > 0.8 * math.log(len(SHAPES))
    assert collapsed["shape_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["feature_spread"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["shape_acc"] < 0.5


@pytest.mark.slow
def test_quick_benchmark_runs_end_to_end(tmp_path):
    """The CI mode of the benchmark: every scheme adapts the shipped Shapes DiffAE and the
    shipped Shapes StyleGAN2, and the tables carry every metric, the CLIP directional
    similarity from ipl_diffusion.metrics too."""
    bench.main(["--quick", "--output_dir", str(tmp_path)])
    table = (tmp_path / "table.md").read_text()
    for name in ("manual (NADA)", "learned", "random", "adaptive (IPL)", "CLIP directional sim.", "LPIPS-style diversity"):
        assert name in table
    for backend in ("diffae", "stylegan2"):
        lines = [line for line in table.splitlines() if line.startswith(f"| {backend} |")]
        assert len(lines) == 5, f"{backend}: four schemes and the source row"
        assert (tmp_path / "grids" / f"{backend}_sketch.png").is_file()
    with open(tmp_path / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["backend"] for r in rows} == {"diffae", "stylegan2"}
    assert "clip_direction" in rows[0] and "lpips_diversity" in rows[0]
    # A re-run finds every run in runs.csv and adapts nothing (an interrupted benchmark resumes).
    bench.main(["--quick", "--output_dir", str(tmp_path)])
    with open(tmp_path / "runs.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
