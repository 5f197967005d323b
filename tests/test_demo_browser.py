"""`ipl demo`: the page in a real headless Chromium (slow; skipped without Chromium, Gradio
or Playwright), and the session behind it without a browser."""

import json
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

import demo_browser

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gradio_needed():
    pytest.importorskip("gradio", reason="the demo needs Gradio: pip install 'ipl-diffusion[demo]'")


def test_demo_page_in_headless_chromium(gradio_needed, tmp_path):
    missing = demo_browser.missing_requirements()
    if missing:
        pytest.skip(f"browser check needs {', '.join(missing)} (.ci/demo-browser installs them)")
    app, url = demo_browser.serve_demo()
    try:
        report = demo_browser.drive(url, tmp_path / "browser")
    finally:
        app.close()
    shot = os.environ.get("IPL_DEMO_SCREENSHOT")  # CI keeps the finished page to look at
    if shot:
        Image.open(tmp_path / "browser" / "demo.png").save(shot)
    assert report["sources"] == 8  # sampled from the source generator
    assert "Stage" in report["progress_text"]  # live progress while it ran
    assert "photo → neon" in report["status"] and "3 iterations" in report["status"]
    before, after = (np.asarray(Image.open(report[k]).convert("RGB"), dtype=np.int16) for k in ("before", "after"))
    assert before.shape == after.shape == (2 * 192, 4 * 192, 3)  # 8 images, 4 a row, shown large
    assert np.abs(before - after).mean() > 0.1  # the adapted generator draws differently
    files = report["zip_files"]
    assert {"ipl-neon/model_index.json", "ipl-neon/pipeline_stylegan_ipl.py", "ipl-neon/generator/stylegan2.py", "ipl-neon/README.md"} <= set(files)
    with zipfile.ZipFile(report["zip"]) as archive:
        index = json.loads(archive.read("ipl-neon/model_index.json"))
    assert index["_class_name"] == ["pipeline_stylegan_ipl", "StyleGANIPLPipeline"] and index["target_label"] == "neon"
    with Image.open(tmp_path / "browser" / "demo.png") as page:
        assert page.size[0] == 1280 and page.size[1] > 1000


def test_demo_session_diffae_with_given_images(gradio_needed, tmp_path):
    """The DiffAE path behind the page (uploaded images are translated), and the zip loads."""
    from ipl_diffusion.cli.demo import DemoSession, build_app, pipeline_zip, run_summary
    from ipl_diffusion.pipelines.pipeline_ipl import IPLPipeline

    session = DemoSession(device="cpu")
    assert session.domains("diffae") == ["sketch", "neon", "pixel art", "mosaic"]  # the source, photo, is left out
    build_app(session)  # the page builds for the embedded models
    images = session.sample_sources("diffae", 2, seed=1)
    options = dict(iterations=1, stage1_iterations=2, seed=0)
    adapted, before, after = session.adapt("diffae", "sketch", images, None, options)
    assert before == images and len(after) == 2 and after[0].size == images[0].size
    assert "photo → sketch" in run_summary(adapted)
    with pytest.raises(ValueError, match="at least 2 source images"):
        session.adapt("diffae", "sketch", images[:1], None, options)
    with zipfile.ZipFile(pipeline_zip(adapted, "Sketch")) as archive:
        archive.extractall(tmp_path)
    assert IPLPipeline.from_pretrained(tmp_path / "ipl-sketch").config.target_label == "sketch"
