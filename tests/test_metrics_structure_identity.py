"""SCS (HED edges) and ID (ArcFace IR-SE50 / pluggable features) against hand computations."""

import pytest
import torch

from ipl_diffusion.metrics import HED, IRSE50, ArcFaceFeatures, edge_similarity, identity_similarity, structural_consistency
from ipl_diffusion.metrics.scs import quantize_edges


@pytest.fixture(scope="module")
def hed():
    torch.manual_seed(0)
    return HED()


def test_edge_similarity_by_hand():
    s = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])
    t = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # 2 * (1) / ((1 + 0.25) + (1 + 1)) = 2 / 3.25
    assert edge_similarity(s, t).item() == pytest.approx(2 / 3.25)
    assert edge_similarity(s, s).item() == pytest.approx(1.0)
    assert edge_similarity(torch.zeros_like(s), torch.zeros_like(s)).item() == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        edge_similarity(s, t[..., :1])


def test_quantize_edges_mirrors_an_8_bit_png_round_trip():
    e = torch.tensor([0.0, 0.5, 0.999, 1.2, -0.1])
    torch.testing.assert_close(quantize_edges(e), torch.tensor([0.0, 127 / 255, 254 / 255, 1.0, 0.0]))


def test_hed_layout_loads_the_published_module_prefix(hed, tmp_path):
    # sniklaus' file names its modules "moduleVggOne..."; the port renames them to "netVggOne...".
    state = {k.replace("net", "module", 1): v for k, v in hed.state_dict().items()}
    assert "moduleVggTwo.1.weight" in state and "moduleCombine.0.weight" in state
    torch.save(state, tmp_path / "network-bsds500.pytorch")
    loaded = HED.from_pretrained(str(tmp_path / "network-bsds500.pytorch"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x), hed(x))
    assert hed(x).shape == (1, 1, 32, 32) and 0 < hed(x).min() and hed(x).max() < 1


def test_hed_feeds_caffe_bgr_minus_mean(hed):
    seen = {}
    handle = hed.netVggOne.register_forward_pre_hook(lambda m, inputs: seen.setdefault("x", inputs[0]))
    rgb = torch.tensor([0.2, -0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    hed(rgb)
    handle.remove()
    pixel = seen["x"][0, :, 0, 0]
    expected = torch.tensor([(0.6 + 1) * 127.5 - 104.00698793, (-0.4 + 1) * 127.5 - 116.66876762,
                             (0.2 + 1) * 127.5 - 122.67891434])
    torch.testing.assert_close(pixel, expected)


def test_structural_consistency_matches_the_formula(hed):
    torch.manual_seed(2)
    source = torch.rand(3, 3, 32, 32) * 2 - 1
    adapted = source.flip(-1)
    values = structural_consistency(source, adapted, hed, batch_size=2)
    s, t = quantize_edges(hed(source)), quantize_edges(hed(adapted))
    expected = [2 * (s[i] * t[i]).sum() / (s[i] ** 2 + t[i] ** 2).sum() for i in range(3)]
    torch.testing.assert_close(values, torch.stack(expected).double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(structural_consistency(source, source, hed), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="paired images"):
        structural_consistency(source, adapted[:2], hed)


@pytest.mark.slow
def test_irse50_layout_and_normalised_output(tmp_path):
    torch.manual_seed(0)
    model = IRSE50()
    keys = model.state_dict()
    # Key names of TreB1eN / pSp's model_ir_se50.pth
    assert keys["input_layer.0.weight"].shape == (64, 3, 3, 3)
    assert keys["body.3.shortcut_layer.0.weight"].shape == (128, 64, 1, 1)
    assert keys["body.23.res_layer.5.fc1.weight"].shape == (32, 512, 1, 1)
    assert keys["output_layer.3.weight"].shape == (512, 512 * 7 * 7)
    assert len([k for k in keys if k.startswith("body.") and k.endswith("res_layer.1.weight")]) == 24
    torch.save(keys, tmp_path / "model_ir_se50.pth")
    loaded = IRSE50.from_pretrained(str(tmp_path / "model_ir_se50.pth"))
    faces = torch.rand(1, 3, 112, 112) * 2 - 1
    out = loaded(faces)
    torch.testing.assert_close(out, model(faces))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(1))


def test_small_irse_variant_gives_unit_embeddings():
    torch.manual_seed(0)
    model = IRSE50(stages=((16, 16, 1), (16, 32, 2)), embedding_dim=12)
    assert model.output_layer[3].in_features == 32 * 28 * 28
    out = model(torch.rand(3, 3, 112, 112) * 2 - 1)
    assert out.shape == (3, 12)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_arcface_crop_follows_psp_and_diffusionclip():
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, faces):
            seen["faces"] = faces
            return faces.mean(dim=(2, 3))

    features = ArcFaceFeatures(Recorder())
    image = torch.rand(1, 3, 512, 512) * 2 - 1
    features(image)
    pooled = torch.nn.functional.adaptive_avg_pool2d(image, (256, 256))
    expected = torch.nn.functional.adaptive_avg_pool2d(pooled[:, :, 35:223, 32:220], (112, 112))
    torch.testing.assert_close(seen["faces"], expected)


def test_identity_similarity_is_cosine_of_pluggable_features():
    features = torch.nn.Flatten()
    a = torch.tensor([[[[1.0]], [[0.0]], [[0.0]]], [[[1.0]], [[1.0]], [[0.0]]]])
    b = torch.tensor([[[[0.0]], [[1.0]], [[0.0]]], [[[2.0]], [[2.0]], [[0.0]]]])
    torch.testing.assert_close(identity_similarity(a, b, features), torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="paired"):
        identity_similarity(a, b[:1], features)
