"""CLIP metrics by hand and on the tiny CLIP; weight resolution errors (offline, no download)."""

import time

import pytest
import torch

from ipl_diffusion.metrics import (
    HED,
    InceptionV3,
    clip_directional_similarity,
    clip_encoders,
    clip_score,
    directional_similarity_from_features,
)
from ipl_diffusion.metrics.weights import load_state_dict, resolve_weights
from ipl_diffusion.metrics.inception import TORCHVISION_SPEC

PROCESSOR = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def test_directional_similarity_by_hand():
    source = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    adapted = torch.tensor([[0.0, 3.0, 0.0], [0.0, 1.0, 0.0]])  # second pair: same direction after normalising
    t_source, t_target = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    sims = directional_similarity_from_features(source, adapted, t_source, t_target)
    # pair 0: image direction (-1, 1, 0)/sqrt2, text direction (-1, 1, 0)/sqrt2 -> 1; pair 1: unchanged -> 0
    torch.testing.assert_close(sims, torch.tensor([1.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="same text embedding"):
        directional_similarity_from_features(source, adapted, t_source, t_source)


def test_clip_metrics_on_tiny_clip(tiny_clip):
    from ipl_diffusion.clip_text import CLIPPromptEncoder

    model, tokenizer = tiny_clip
    encoder = CLIPPromptEncoder(model, tokenizer, PROCESSOR)
    image_encoder, label_encoder = clip_encoders(encoder, templates="single")
    torch.manual_seed(0)
    source, adapted = torch.rand(3, 3, 40, 40) * 2 - 1, torch.rand(3, 3, 40, 40) * 2 - 1
    t_s, t_t = label_encoder("photo"), label_encoder("sketch")
    sims = clip_directional_similarity(source, adapted, t_s, t_t, image_encoder, batch_size=2)
    fs, fa = encoder.encode_images(source), encoder.encode_images(adapted)
    d_img = torch.nn.functional.normalize(fa / fa.norm(dim=1, keepdim=True) - fs / fs.norm(dim=1, keepdim=True), dim=1)
    d_txt = torch.nn.functional.normalize(t_t - t_s, dim=0)
    torch.testing.assert_close(sims, (d_img @ d_txt).double(), rtol=1e-4, atol=1e-5)
    scores = clip_score(adapted, t_t, image_encoder)
    cos = torch.nn.functional.cosine_similarity(fa, t_t[None], dim=1).double()
    torch.testing.assert_close(scores["cosine"], cos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores["clip_score"], 100 * cos.clamp_min(0), rtol=1e-4, atol=1e-3)


def test_missing_weights_name_the_network_and_how_to_supply_them():
    with pytest.raises(ValueError, match=r"Inception-v3 .*inception_v3_google-0cc3c7bd\.pth.*--inception-weights"):
        InceptionV3.from_pretrained(None, metric="IS")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HED.from_pretrained("./no/such/network-bsds500.pytorch")


def test_offline_hub_id_fails_fast_without_a_socket(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"offline \(HF_HUB_OFFLINE=1\).*Pass a local file"):
        resolve_weights("someone/inception-weights", TORCHVISION_SPEC, "IS")
    assert time.monotonic() - start < 5


def test_a_missing_relative_weights_file_is_not_mistaken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"weights file 'weights/inception\.pth' does not exist"):
        resolve_weights("weights/inception.pth", TORCHVISION_SPEC, "IS")


def test_folder_without_the_default_file_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no 'inception_v3_google-0cc3c7bd.pth'"):
        resolve_weights(tmp_path, TORCHVISION_SPEC, "IS")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="could not be read"):
        load_state_dict(bad)
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(load_state_dict(tmp_path / "w.safetensors")["a"], torch.ones(2))
    torch.save({"state_dict": {"b": torch.zeros(1)}}, tmp_path / "wrapped.pth")
    assert set(load_state_dict(tmp_path / "wrapped.pth")) == {"b"}
