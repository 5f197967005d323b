import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never touch the network: every model is built in code or loaded from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# The suite is sized for 2 cores (CI's machine); more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("single_thread")``).

    Tiny models are latency-bound: one thread avoids OpenMP hand-offs that cost more than the
    work (on a loaded 2-core runner, 2 threads ran ~50x slower for the tiny StyleGAN2s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_clip():
    """``(CLIPModel, CLIPTokenizer)``: a tiny random CLIP and its offline tokenizer."""
    from tiny_clip import build_clip

    return build_clip()


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no new file can be created in, for root too (root ignores chmod)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    folder = Path("/sys/fs")  # sysfs: nobody can create files there
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        yield folder
        return
    pytest.skip("no read-only folder available")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Diff-IPL source pipeline (tests/tiny_ipl.py), saved once per module with
    ``save_pretrained`` so that tests load it through the real loading path."""
    from tiny_ipl import build_tiny_ipl_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "source"
    build_tiny_ipl_pipeline().save_pretrained(folder)
    return folder
