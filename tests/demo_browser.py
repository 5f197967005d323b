"""Drive the `ipl demo` page in headless Chromium (Debian's /usr/bin/chromium, through the
Playwright Python package, which launches it by path and downloads no browser).

Used by tests/test_demo_browser.py and runnable on its own (what `.ci/demo-browser` runs):

    python tests/demo_browser.py OUT_DIR        # serves the embedded models, drives the page

It samples StyleGAN2 sources, types a target domain, runs a short adaptation, watches the
progress text appear, and writes OUT_DIR/progress.png, OUT_DIR/demo.png (the finished page)
and OUT_DIR/<pipeline>.zip (the downloaded pipeline); it prints a JSON report.
"""

import json
import os
import shutil
import socket
import sys
import tempfile
import time
import zipfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# No GPU, no sandbox (root in a container), and nothing that phones home.
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def missing_requirements() -> list:
    """What this machine lacks to run the browser check (empty when it can run)."""
    import importlib.util

    missing = [name for name in ("gradio", "playwright") if importlib.util.find_spec(name) is None]
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    return missing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_demo(device="cpu"):
    """Start the demo on the embedded models in this process; returns ``(app, url)``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ipl_diffusion.cli.demo import DemoSession, build_app, launch

    port = free_port()
    app = build_app(DemoSession(device=device))
    launch(app, "127.0.0.1", port, block=False)
    return app, f"http://127.0.0.1:{port}/"


def drive(url: str, out: Path, target: str = "neon", stage1: int = 3, iterations: int = 3, timeout_s: float = 420) -> dict:
    """Use the page as a person would; returns what it saw (see the module docstring)."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    profile = tempfile.mkdtemp(prefix="chromium-profile-")  # a fresh user-data-dir
    report = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 1500}, accept_downloads=True,
            )
            page = browser.new_page()
            page.goto(url, wait_until="domcontentloaded")
            page.locator("#adapt").wait_for(timeout=60_000)
            page.locator("#backend").get_by_text("stylegan2", exact=True).click()
            page.wait_for_timeout(1500)  # the backend's domains and iteration defaults arrive
            page.locator("#domain input").fill(target)
            page.locator("#domain input").press("Enter")
            page.get_by_text("Iterations", exact=True).click()  # open the accordion
            for element, value in (("#stage1", stage1), ("#iterations", iterations)):
                number = page.locator(f"{element} input[type=number]")
                number.fill(str(value))
                number.press("Enter")
            page.locator("#sample").click()
            page.locator("#sources img").first.wait_for(timeout=60_000)
            report["sources"] = page.locator("#sources img").count()
            page.locator("#adapt").click()
            report["progress_text"] = _watch_progress(page, out / "progress.png")
            page.locator("#download a").first.wait_for(timeout=timeout_s * 1000)
            report["status"] = page.locator("#status").inner_text()
            for name in ("before", "after"):  # the images as the page serves them
                src = page.locator(f"#{name} img").get_attribute("src")
                (out / f"{name}.webp").write_bytes(page.request.get(src).body())
                report[name] = str(out / f"{name}.webp")
            page.screenshot(path=str(out / "demo.png"), full_page=True)
            with page.expect_download() as download:
                page.locator("#download a").first.click()
            zip_path = out / download.value.suggested_filename
            download.value.save_as(zip_path)
            report["zip"] = str(zip_path)
            report["zip_files"] = sorted(zipfile.ZipFile(zip_path).namelist())
            browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return report


def _watch_progress(page, screenshot: Path, within_s: float = 120) -> str:
    """The progress text Gradio shows while the adaptation runs (tqdm's bars, tracked), once
    it names a stage; a screenshot of the page at that moment."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        texts = page.locator(".progress-text, .progress-level-inner, .eta-bar + *").all_inner_texts()
        text = " ".join(t.strip() for t in texts if t.strip())
        if "Stage" in text:
            page.screenshot(path=str(screenshot), full_page=True)
            return text
        page.wait_for_timeout(250)
    return ""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    missing = missing_requirements()
    if missing:
        print(f"cannot run the browser check, missing: {', '.join(missing)}", file=sys.stderr)
        return 2
    app, url = serve_demo()
    try:
        report = drive(url, Path(argv[0] if argv else "demo-browser"))
    finally:
        app.close()
    print(json.dumps(report, indent=1))
    ok = report["progress_text"] and "pipeline_stylegan_ipl.py" in " ".join(report["zip_files"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
