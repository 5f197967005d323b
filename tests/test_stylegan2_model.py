"""StyleGAN2 generator: plain-PyTorch ops vs their definitions, rosinality layout, loading.

Generators are built in code, saved in the rosinality layout
(``torch.save({"g_ema": sd, "latent_avg": ..., "args": Namespace(...)})``) and loaded back
through the real path (``ipl_diffusion.conversion.stylegan2``).
"""

import argparse
import math
import os

import numpy as np
import pytest
import torch

from ipl_diffusion.conversion.stylegan2 import convert_stylegan2_checkpoint, generator_from_checkpoint, load_rosinality_checkpoint
from ipl_diffusion.models.stylegan2 import StyleGAN2Generator, fused_leaky_relu, make_kernel, upfirdn2d

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny latency-bound models (conftest.py)


# ----------------------------------------------------------------------------------------
# upfirdn2d / fused activation against direct re-statements of their definitions
# ----------------------------------------------------------------------------------------


def upfirdn2d_by_definition(x, kernel, up, down, pad0, pad1):
    """Loop over output pixels: out[oy, ox] = sum_ij k[i, j] * padded_up[oy*down + kh-1-i, ox*down + kw-1-j]
    (true convolution of the zero-stuffed, padded signal, then decimation)."""
    x = x.numpy().astype(np.float64)
    k = kernel.numpy().astype(np.float64)
    n, c, h, w = x.shape
    kh, kw = k.shape
    out_h = (h * up + pad0 + pad1 - kh) // down + 1
    out_w = (w * up + pad0 + pad1 - kw) // down + 1

    def padded_up(ch, a, b):
        a, b = a - pad0, b - pad0  # position in the zero-stuffed signal
        if a < 0 or b < 0 or a >= h * up or b >= w * up or a % up or b % up:
            return 0.0
        return ch[a // up, b // up]

    out = np.zeros((n, c, out_h, out_w))
    for bi in range(n):
        for ci in range(c):
            for oy in range(out_h):
                for ox in range(out_w):
                    total = 0.0
                    for i in range(kh):
                        for j in range(kw):
                            total += k[i, j] * padded_up(x[bi, ci], oy * down + kh - 1 - i, ox * down + kw - 1 - j)
                    out[bi, ci, oy, ox] = total
    return torch.from_numpy(out)


@pytest.mark.parametrize(
    "up,down,pad",
    [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (0, 0)), (1, 1, (-1, 2)), (3, 1, (1, 1))],
)
def test_upfirdn2d_matches_definition(up, down, pad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    kernel = torch.randn(4, 3)  # asymmetric and non-square: a flip or transpose bug shows
    expected = upfirdn2d_by_definition(x, kernel, up, down, *pad)
    got = upfirdn2d(x, kernel, up=up, down=down, pad=pad)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_upfirdn2d_is_differentiable():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    kernel = make_kernel([1, 3, 3, 1]).double() * 4
    assert torch.autograd.gradcheck(lambda t: upfirdn2d(t, kernel, up=2, pad=(2, 1)), (x,))


def test_blur_kernel_preserves_constant_image():
    # The [1,3,3,1] filter with gain 4 after 2x zero insertion keeps a constant image constant
    # (away from the borders): what the Upsample module relies on.
    x = torch.ones(1, 1, 6, 6)
    out = upfirdn2d(x, make_kernel([1, 3, 3, 1]) * 4, up=2, pad=(2, 1))
    assert out.shape == (1, 1, 12, 12)
    torch.testing.assert_close(out[..., 2:-2, 2:-2], torch.ones(1, 1, 8, 8))


def test_fused_leaky_relu_matches_definition():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5)
    bias = torch.randn(4)
    pre = x + bias.view(1, 4, 1, 1)
    expected = torch.where(pre >= 0, pre, 0.2 * pre) * math.sqrt(2)
    torch.testing.assert_close(fused_leaky_relu(x, bias), expected)
    # 2-D input (mapping network): bias along dim 1
    x2, b2 = torch.randn(3, 4), torch.randn(4)
    pre2 = x2 + b2
    torch.testing.assert_close(fused_leaky_relu(x2, b2), torch.where(pre2 >= 0, pre2, 0.2 * pre2) * math.sqrt(2))


# ----------------------------------------------------------------------------------------
# rosinality layout
# ----------------------------------------------------------------------------------------


def rosinality_layout(size, n_mlp, style_dim, channel_multiplier):
    """Key -> shape of rosinality's ``Generator(size, style_dim, n_mlp, channel_multiplier)``,
    written out from the upstream layout (not from our module)."""
    channels = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * channel_multiplier, 128: 128 * channel_multiplier, 256: 64 * channel_multiplier}
    layout = {}
    for i in range(1, n_mlp + 1):
        layout[f"style.{i}.weight"] = (style_dim, style_dim)
        layout[f"style.{i}.bias"] = (style_dim,)
    layout["input.input"] = (1, 512, 4, 4)

    def styled(prefix, cin, cout, up):
        layout[f"{prefix}.conv.weight"] = (1, cout, cin, 3, 3)
        layout[f"{prefix}.conv.modulation.weight"] = (cin, style_dim)
        layout[f"{prefix}.conv.modulation.bias"] = (cin,)
        if up:
            layout[f"{prefix}.conv.blur.kernel"] = (4, 4)
        layout[f"{prefix}.noise.weight"] = (1,)
        layout[f"{prefix}.activate.bias"] = (cout,)

    def to_rgb(prefix, cin, up):
        layout[f"{prefix}.conv.weight"] = (1, 3, cin, 1, 1)
        layout[f"{prefix}.conv.modulation.weight"] = (cin, style_dim)
        layout[f"{prefix}.conv.modulation.bias"] = (cin,)
        layout[f"{prefix}.bias"] = (1, 3, 1, 1)
        if up:
            layout[f"{prefix}.upsample.kernel"] = (4, 4)

    styled("conv1", 512, 512, False)
    to_rgb("to_rgb1", 512, False)
    log_size = int(math.log2(size))
    cin = 512
    for i in range(3, log_size + 1):
        cout = channels[2**i]
        k = 2 * (i - 3)
        styled(f"convs.{k}", cin, cout, True)
        styled(f"convs.{k + 1}", cout, cout, False)
        to_rgb(f"to_rgbs.{i - 3}", cout, True)
        cin = cout
    for j in range((log_size - 2) * 2 + 1):
        r = 2 ** ((j + 5) // 2)
        layout[f"noises.noise_{j}"] = (1, 1, r, r)
    return layout


CONFIGS = [(32, 1, 2), (32, 2, 8), (64, 1, 8), (64, 2, 2)]  # (size, channel_multiplier, n_mlp)
STYLE_DIM = 16


def save_rosinality(path, generator, args_overrides=None):
    args = argparse.Namespace(size=generator.size, latent=generator.style_dim, n_mlp=generator.config.n_mlp, channel_multiplier=generator.config.channel_multiplier, iter=800000, batch=16)
    for key, value in (args_overrides or {}).items():
        setattr(args, key, value)
    torch.save({"g_ema": generator.state_dict(), "latent_avg": torch.zeros(generator.style_dim), "args": args}, path)


@pytest.mark.parametrize("size,cm,n_mlp", CONFIGS)
def test_state_dict_is_rosinality_layout(size, cm, n_mlp):
    torch.manual_seed(0)
    g = StyleGAN2Generator(size=size, style_dim=STYLE_DIM, n_mlp=n_mlp, channel_multiplier=cm)
    ours = {k: tuple(v.shape) for k, v in g.state_dict().items()}
    assert ours == rosinality_layout(size, n_mlp, STYLE_DIM, cm)
    assert g.n_latent == 2 * int(math.log2(size)) - 2
    assert [type(m).__name__ for m in g.children()][:7] == ["Sequential", "ConstantInput", "StyledConv", "ToRGB", "ModuleList", "ModuleList", "ModuleList"]


@pytest.mark.parametrize("size,cm,n_mlp", CONFIGS)
def test_rosinality_checkpoint_loads_strictly(tmp_path, size, cm, n_mlp):
    torch.manual_seed(1)
    g = StyleGAN2Generator(size=size, style_dim=STYLE_DIM, n_mlp=n_mlp, channel_multiplier=cm).eval()
    path = tmp_path / "model.pt"
    save_rosinality(path, g)
    checkpoint = load_rosinality_checkpoint(path)
    assert isinstance(checkpoint["args"], argparse.Namespace) and checkpoint["args"].size == size
    loaded = generator_from_checkpoint(path)
    assert dict(loaded.config)["size"] == size and loaded.config.n_mlp == n_mlp and loaded.config.style_dim == STYLE_DIM
    if size >= 64:  # the multiplier shows in the widths only from 64 px on
        assert loaded.config.channel_multiplier == cm
    sd, ref = loaded.state_dict(), g.state_dict()
    assert sd.keys() == ref.keys()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    # A plain strict load into a freshly built model of the same config also works.
    StyleGAN2Generator(size=size, style_dim=STYLE_DIM, n_mlp=n_mlp, channel_multiplier=cm).load_state_dict(checkpoint["g_ema"], strict=True)


def test_loaded_generator_reproduces_images(tmp_path):
    torch.manual_seed(2)
    g = StyleGAN2Generator(size=32, style_dim=STYLE_DIM, n_mlp=2, channel_max=32).eval()
    path = tmp_path / "g.pt"
    save_rosinality(path, g)
    loaded = generator_from_checkpoint(path).eval()
    z = torch.randn(2, STYLE_DIM)
    with torch.no_grad():
        a, _ = g([z], randomize_noise=False)
        b, _ = loaded([z], randomize_noise=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize(
    "requested,name",
    [({"channel_multiplier": 1}, "channel_multiplier"), ({"size": 128}, "size"), ({"n_mlp": 8}, "n_mlp"), ({"style_dim": 512}, "style_dim")],
)
def test_wrong_config_names_the_hyper_parameter(tmp_path, requested, name):
    torch.manual_seed(0)
    g = StyleGAN2Generator(size=64, style_dim=STYLE_DIM, n_mlp=2, channel_multiplier=2)
    path = tmp_path / "g.pt"
    save_rosinality(path, g)
    with pytest.raises(ValueError, match=rf"disagree on {name}: the checkpoint has {name}="):
        generator_from_checkpoint(path, **requested)
    with pytest.raises(ValueError, match=name):
        convert_stylegan2_checkpoint(path, tmp_path / "out", **requested)


def test_args_namespace_does_not_override_shapes(tmp_path):
    # rosinality's args can disagree with the network (e.g. --size edited); the shapes win.
    g = StyleGAN2Generator(size=32, style_dim=STYLE_DIM, n_mlp=2, channel_max=32)
    path = tmp_path / "g.pt"
    save_rosinality(path, g, {"size": 1024, "channel_multiplier": 7})
    assert generator_from_checkpoint(path).config.size == 32


def test_channel_multiplier_invisible_at_small_sizes_is_accepted():
    # At 32 px every width is 512 whatever the multiplier: both requests must load.
    g = StyleGAN2Generator(size=32, style_dim=STYLE_DIM, n_mlp=2, channel_multiplier=2)
    for cm in (1, 2):
        loaded = StyleGAN2Generator.from_rosinality_state_dict(g.state_dict(), channel_multiplier=cm)
        assert loaded.config.channel_multiplier == cm


def test_not_a_generator_is_a_clear_error(tmp_path):
    path = tmp_path / "d.pt"
    torch.save({"g_ema": {"convs.0.0.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="input.input"):
        generator_from_checkpoint(path)
    torch.save({"d": {}}, path)
    with pytest.raises(ValueError, match="no 'g_ema'"):
        load_rosinality_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_rosinality_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError):
        load_rosinality_checkpoint(tmp_path / "junk.pt")
    g = StyleGAN2Generator(size=32, style_dim=STYLE_DIM, n_mlp=2, channel_max=32)
    sd = g.state_dict()
    sd.pop("conv1.noise.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['conv1.noise.weight'\].*unexpected keys \['extra.weight'\]"):
        StyleGAN2Generator(size=32, style_dim=STYLE_DIM, n_mlp=2, channel_max=32).load_rosinality_state_dict(sd)


class _Payload:
    """Unpickling this would call os.mkdir(marker): a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    g = StyleGAN2Generator(size=32, style_dim=STYLE_DIM, n_mlp=2, channel_max=32)
    path = tmp_path / "evil.pt"
    torch.save({"g_ema": g.state_dict(), "args": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_rosinality_checkpoint(path)
    with pytest.raises(ValueError, match="refusing to load"):
        convert_stylegan2_checkpoint(path, tmp_path / "out")
    assert not os.path.exists(marker)
    assert not (tmp_path / "out").exists()


def test_convert_writes_safetensors_folder(tmp_path):
    torch.manual_seed(3)
    g = StyleGAN2Generator(size=32, style_dim=STYLE_DIM, n_mlp=2, channel_max=32).eval()
    save_rosinality(tmp_path / "g.pt", g)
    out = convert_stylegan2_checkpoint(tmp_path / "g.pt", tmp_path / "converted")
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    loaded = StyleGAN2Generator.from_pretrained(out).eval()
    z = torch.randn(3, STYLE_DIM)
    with torch.no_grad():
        torch.testing.assert_close(loaded([z], randomize_noise=False)[0], g([z], randomize_noise=False)[0], atol=0, rtol=0)
    # and back to the upstream layout
    assert loaded.to_rosinality_state_dict().keys() == g.state_dict().keys()


# ----------------------------------------------------------------------------------------
# latents: validation, truncation, style mixing
# ----------------------------------------------------------------------------------------


@pytest.fixture
def tiny_g():
    torch.manual_seed(4)
    return StyleGAN2Generator(size=32, style_dim=STYLE_DIM, n_mlp=2, channel_max=16).eval()


@pytest.mark.parametrize(
    "latent,is_latent,fragment",
    [
        (torch.randn(2, 17), False, r"shape \(2, 17\); expected \(N, 16\)"),
        (torch.randn(16), False, r"shape \(16,\)"),
        (torch.randn(2, 8, 16), False, r"expected \(N, 16\) with"),  # w+ passed as z
        (torch.randn(2, 7, 16), True, r"expected \(N, 16\) or \(N, 8, 16\)"),
        (torch.randn(0, 16), False, "N >= 1"),
        (torch.zeros(2, 16, dtype=torch.long), False, "floating-point"),
    ],
)
def test_latent_validation(tiny_g, latent, is_latent, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiny_g([latent], input_is_latent=is_latent)


def test_z_w_wplus_agree(tiny_g):
    z = torch.randn(2, STYLE_DIM)
    with torch.no_grad():
        w = tiny_g.get_latent(z)
        a, latents = tiny_g([z], randomize_noise=False, return_latents=True)
        b, _ = tiny_g([w], input_is_latent=True, randomize_noise=False)
        c, _ = tiny_g(w.unsqueeze(1).repeat(1, tiny_g.n_latent, 1), input_is_latent=True, randomize_noise=False)
    assert a.shape == (2, 3, 32, 32) and latents.shape == (2, tiny_g.n_latent, STYLE_DIM)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_truncation(tiny_g):
    z = torch.randn(3, STYLE_DIM)
    centre = tiny_g.mean_latent(512)
    with torch.no_grad():
        _, w_half = tiny_g([z], truncation=0.5, truncation_latent=centre, return_latents=True)
        _, w_full = tiny_g([z], return_latents=True)
        img0, _ = tiny_g([z], truncation=0.0, truncation_latent=centre, randomize_noise=False)
    torch.testing.assert_close(w_half, centre.unsqueeze(1) + 0.5 * (w_full - centre.unsqueeze(1)))
    # psi = 0 collapses every sample onto the centre's image
    torch.testing.assert_close(img0[0], img0[1])
    torch.testing.assert_close(img0[0], img0[2])
    # the default centre is reproducible
    torch.testing.assert_close(tiny_g.mean_latent(), tiny_g.mean_latent())


def test_style_mixing(tiny_g):
    z1, z2 = torch.randn(2, STYLE_DIM), torch.randn(2, STYLE_DIM)
    with torch.no_grad():
        w1, w2 = tiny_g.get_latent(z1), tiny_g.get_latent(z2)
        _, mixed = tiny_g([z1, z2], inject_index=3, return_latents=True)
    torch.testing.assert_close(mixed[:, :3], w1.unsqueeze(1).expand(-1, 3, -1))
    torch.testing.assert_close(mixed[:, 3:], w2.unsqueeze(1).expand(-1, tiny_g.n_latent - 3, -1))
    with pytest.raises(ValueError, match="inject_index"):
        tiny_g([z1, z2], inject_index=0)
    with pytest.raises(ValueError, match="same batch size"):
        tiny_g([z1, torch.randn(3, STYLE_DIM)])
    with pytest.raises(ValueError, match="two for style mixing"):
        tiny_g([z1, z1, z1])


def test_latent_index_modules_follow_synthesis(tiny_g):
    # Perturb one W+ row at a time: exactly the modules latent_index_modules names see it.
    # Check by hooking every module's style input.
    seen = {}

    def hook(name):
        def fn(module, args):
            seen.setdefault(name, []).append(args[1])

        return fn

    names = ["conv1", "to_rgb1"] + [f"convs.{k}" for k in range(len(tiny_g.convs))] + [f"to_rgbs.{m}" for m in range(len(tiny_g.to_rgbs))]
    handles = [tiny_g.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    w_plus = torch.arange(tiny_g.n_latent, dtype=torch.float32).view(1, -1, 1).expand(1, -1, STYLE_DIM).contiguous()
    with torch.no_grad():
        tiny_g.synthesis(w_plus, randomize_noise=False)
    for h in handles:
        h.remove()
    consumers = {j: sorted(n for n in names if int(seen[n][0][0, 0]) == j) for j in range(tiny_g.n_latent)}
    for j in range(tiny_g.n_latent):
        assert sorted(tiny_g.latent_index_modules(j)) == consumers[j]


def test_save_pretrained_round_trip(tmp_path, tiny_g):
    tiny_g.save_pretrained(tmp_path / "g")
    assert (tmp_path / "g" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = StyleGAN2Generator.from_pretrained(tmp_path / "g")
    assert loaded.config.channel_max == 16 and loaded.n_latent == tiny_g.n_latent
    z = torch.randn(2, STYLE_DIM)
    with torch.no_grad():
        torch.testing.assert_close(loaded([z], randomize_noise=False)[0], tiny_g([z], randomize_noise=False)[0])


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="power of two"):
        StyleGAN2Generator(size=100)
    with pytest.raises(ValueError, match="n_mlp"):
        StyleGAN2Generator(size=32, n_mlp=0)


# ----------------------------------------------------------------------------------------
# discriminator and small configs (for training small generators, e.g. the Shapes world)
# ----------------------------------------------------------------------------------------


def test_discriminator_rosinality_layout_and_forward():
    from ipl_diffusion.models.stylegan2 import StyleGAN2Discriminator

    torch.manual_seed(0)
    d = StyleGAN2Discriminator(size=32, channel_max=16)
    keys = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    # rosinality: convs = [ConvLayer(3, C, 1), ResBlock x log2(size)-2], then final_conv / final_linear
    assert keys["convs.0.0.weight"] == (16, 3, 1, 1) and keys["convs.0.1.bias"] == (16,)
    for i in range(1, 4):
        assert {f"convs.{i}.conv1.0.weight", f"convs.{i}.conv2.0.kernel", f"convs.{i}.conv2.1.weight", f"convs.{i}.conv2.2.bias", f"convs.{i}.skip.0.kernel", f"convs.{i}.skip.1.weight"} <= set(keys)
    assert f"convs.{i}.skip.1.bias" not in keys and "convs.4.conv1.0.weight" not in keys
    assert keys["final_conv.0.weight"] == (16, 17, 3, 3)  # + the minibatch-stddev map
    assert keys["final_linear.0.weight"] == (16, 16 * 4 * 4) and keys["final_linear.1.weight"] == (1, 16)
    for batch in (1, 3, 6):  # any batch size, not only multiples of the stddev group
        assert d(torch.randn(batch, 3, 32, 32)).shape == (batch, 1)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    d(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        d(torch.randn(2, 3, 16, 16))


def test_small_configs_build():
    from ipl_diffusion.models.stylegan2 import SMALL_CONFIGS

    g = StyleGAN2Generator(**SMALL_CONFIGS["shapes32"])
    from ipl_diffusion.shapes import default_model_path

    shipped = StyleGAN2Generator.load_config(default_model_path("stylegan2") / "source_generator")
    assert all(shipped[k] == v for k, v in SMALL_CONFIGS["shapes32"].items()), "SMALL_CONFIGS must describe the shipped generator"
    assert g.size == 32 and g.n_latent == 8 and sum(p.numel() for p in g.parameters()) < 3_000_000
    with torch.no_grad():
        assert g([torch.randn(2, 128)])[0].shape == (2, 3, 32, 32)


def test_convert_refuses_non_empty_output(tmp_path):
    g = StyleGAN2Generator(size=32, style_dim=STYLE_DIM, n_mlp=2, channel_max=32)
    save_rosinality(tmp_path / "g.pt", g)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert_stylegan2_checkpoint(tmp_path / "g.pt", out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_stylegan2_checkpoint(tmp_path / "g.pt", out, overwrite=True)
    assert (out / "config.json").is_file()


def test_cli_convert_stylegan2(tmp_path, capsys):
    from ipl_diffusion.cli import main

    g = StyleGAN2Generator(size=32, style_dim=STYLE_DIM, n_mlp=2, channel_max=32)
    save_rosinality(tmp_path / "g.pt", g)
    assert main(["convert", "stylegan2", "--checkpoint", str(tmp_path / "g.pt"), "--output", str(tmp_path / "out")]) == 0
    assert StyleGAN2Generator.from_pretrained(tmp_path / "out").config.size == 32
    # a non-empty --output is refused with the flag to pass, and --overwrite writes into it
    capsys.readouterr()
    assert main(["convert", "stylegan2", "--checkpoint", str(tmp_path / "g.pt"), "--output", str(tmp_path / "out")]) == 2
    assert "(--overwrite)" in capsys.readouterr().err
    assert main(["convert", "stylegan2", "--checkpoint", str(tmp_path / "g.pt"), "--output", str(tmp_path / "out"), "--overwrite"]) == 0
    torch.save({"g_ema": {"x": torch.zeros(1)}, "args": _Payload(str(tmp_path / "pwned"))}, tmp_path / "evil.pt")
    assert main(["convert", "stylegan2", "--checkpoint", str(tmp_path / "evil.pt"), "--output", str(tmp_path / "out2")]) == 2
    assert "refusing to load" in capsys.readouterr().err and not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("upsample,demodulate", [(False, True), (True, True), (False, False)])
def test_modulated_conv_equals_modulate_input_then_demodulate_output(upsample, demodulate):
    """The grouped per-sample-weight convolution equals the equivalent formulation that
    scales the *input* channels by the style and the *output* channels by the demodulation
    coefficients around one shared convolution (the StyleGAN2 paper, Sec. 2.2)."""
    import torch.nn.functional as F

    from ipl_diffusion.models.stylegan2 import ModulatedConv2d

    torch.manual_seed(0)
    conv = ModulatedConv2d(5, 7, 3, style_dim=6, demodulate=demodulate, upsample=upsample)
    x, style = torch.randn(3, 5, 8, 8), torch.randn(3, 6)
    s = conv.modulation(style)  # (B, in)
    weight = conv.scale * conv.weight[0]  # (out, in, k, k)
    if upsample:
        out = F.conv_transpose2d(x * s[:, :, None, None], weight.transpose(0, 1), stride=2)
        out = conv.blur(out)
    else:
        out = F.conv2d(x * s[:, :, None, None], weight, padding=1)
    if demodulate:
        dcoef = torch.rsqrt((weight[None] * s[:, None, :, None, None]).pow(2).sum(dim=(2, 3, 4)) + 1e-8)  # (B, out)
        out = out * dcoef[:, :, None, None]
    got = conv(x, style)
    assert got.shape == ((3, 7, 16, 16) if upsample else (3, 7, 8, 8))
    torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)
