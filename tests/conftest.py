import os
import sys

import pytest

# Tests never touch the network: every model is built in code or loaded from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# Tiny test models are dominated by per-op overhead: one thread is faster than two and
# keeps the suite steady on a loaded 2-core machine.
torch.set_num_threads(1)


@pytest.fixture
def tiny_clip():
    """``(CLIPModel, CLIPTokenizer)``: a tiny random CLIP and its offline tokenizer."""
    from tiny_clip import build_clip

    return build_clip()
