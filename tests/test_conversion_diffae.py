"""Upstream DiffAE checkpoint conversion (ipl_diffusion.conversion.diffae, ``ipl convert diffae``).

A tiny upstream-layout state dict is built in code (upstream key names and shapes, small
channels, 2 attention heads to exercise the legacy qkv order), saved as a Lightning-like
``.ckpt`` (callbacks keyed by a class object, as PL 1.4 does), converted, and compared with
a minimal functional re-statement of upstream DiffAE's forward passes.
"""

import argparse
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from ipl_diffusion import DiffAEPipeline
from ipl_diffusion.conversion.diffae import convert_diffae_checkpoint, load_upstream_checkpoint

IMAGE, BASE, EMBED, ZDIM, HEADS = 16, 8, 16, 16, 2
UNET_MULT, ENC_MULT, ATTN = (1, 2), (1, 2, 2), (8,)
HPARAMS = {"img_size": IMAGE, "net_beatgans_attn_head": HEADS, "net_enc_num_res_blocks": 1, "T": 1000, "dropout": 0.1}


# ----------------------------------------------------------------------------- upstream layout
class Layout:
    """Upstream key names / shapes, plus the block list the re-stated forward walks."""

    def __init__(self, generator):
        self.sd, self.g = {}, generator

    def t(self, key, *shape, norm=False):
        if self.g is None:  # shapes only
            self.sd[key] = torch.empty(*shape, device="meta")
            return
        value = torch.randn(*shape, generator=self.g) * 0.2
        self.sd[key] = value + 1 if norm else value

    def res(self, p, cin, cout, cond=True):
        self.t(p + "in_layers.0.weight", cin, norm=True), self.t(p + "in_layers.0.bias", cin)
        self.t(p + "in_layers.2.weight", cout, cin, 3, 3), self.t(p + "in_layers.2.bias", cout)
        if cond:
            self.t(p + "emb_layers.1.weight", 2 * cout, EMBED), self.t(p + "emb_layers.1.bias", 2 * cout)
            self.t(p + "cond_emb_layers.1.weight", cout, ZDIM), self.t(p + "cond_emb_layers.1.bias", cout)
            self.t(p + "out_layers.0.weight", cout, norm=True), self.t(p + "out_layers.0.bias", cout)
            self.t(p + "out_layers.3.weight", cout, cout, 3, 3), self.t(p + "out_layers.3.bias", cout)
        if cin != cout:
            self.t(p + "skip_connection.weight", cout, cin, 1, 1), self.t(p + "skip_connection.bias", cout)

    def attn(self, p, c):
        self.t(p + "norm.weight", c, norm=True), self.t(p + "norm.bias", c)
        self.t(p + "qkv.weight", 3 * c, c, 1), self.t(p + "qkv.bias", 3 * c)
        self.t(p + "proj_out.weight", c, c, 1), self.t(p + "proj_out.bias", c)


def upstream_trunk(layout, p, mult, res_blocks, cond, decoder):
    """Lay out upstream BeatGANsUNetModel / BeatGANsEncoderModel; return their block lists."""
    ch = BASE
    layout.t(p + "input_blocks.0.0.weight", ch, 3, 3, 3), layout.t(p + "input_blocks.0.0.bias", ch)
    chans, res, k, down = [ch], IMAGE, 1, []
    for level, m in enumerate(mult):
        for _ in range(res_blocks):
            ops = [("res", f"{p}input_blocks.{k}.0.", None)]
            layout.res(ops[0][1], ch, m * BASE, cond)
            ch = m * BASE
            if res in ATTN:
                layout.attn(f"{p}input_blocks.{k}.1.", ch)
                ops.append(("attn", f"{p}input_blocks.{k}.1.", None))
            down.append(ops), chans.append(ch)
            k += 1
        if level != len(mult) - 1:
            layout.res(f"{p}input_blocks.{k}.0.", ch, ch, cond)
            down.append([("res", f"{p}input_blocks.{k}.0.", "down")]), chans.append(ch)
            k, res = k + 1, res // 2
    layout.res(p + "middle_block.0.", ch, ch, cond), layout.attn(p + "middle_block.1.", ch)
    layout.res(p + "middle_block.2.", ch, ch, cond)
    mid = [("res", p + "middle_block.0.", None), ("attn", p + "middle_block.1.", None), ("res", p + "middle_block.2.", None)]
    up = []
    if decoder:
        k = 0
        for level, m in reversed(list(enumerate(mult))):
            for i in range(res_blocks + 1):
                layout.res(f"{p}output_blocks.{k}.0.", ch + chans.pop(), m * BASE, cond)
                ch, ops, j = m * BASE, [("res", f"{p}output_blocks.{k}.0.", None)], 1
                if res in ATTN:
                    layout.attn(f"{p}output_blocks.{k}.1.", ch)
                    ops.append(("attn", f"{p}output_blocks.{k}.1.", None))
                    j = 2
                if level and i == res_blocks:
                    layout.res(f"{p}output_blocks.{k}.{j}.", ch, ch, cond)
                    ops.append(("res", f"{p}output_blocks.{k}.{j}.", "up"))
                    res *= 2
                up.append(ops)
                k += 1
    return down, mid, up, ch


def build_upstream_state_dict(prefix="ema_model.", seed=0, latent=True):
    layout = Layout(torch.Generator().manual_seed(seed))
    p = prefix
    layout.t(p + "time_embed.time_embed.0.weight", EMBED, BASE), layout.t(p + "time_embed.time_embed.0.bias", EMBED)
    layout.t(p + "time_embed.time_embed.2.weight", EMBED, EMBED), layout.t(p + "time_embed.time_embed.2.bias", EMBED)
    unet = upstream_trunk(layout, p, UNET_MULT, 1, True, True)
    layout.t(p + "out.0.weight", BASE, norm=True), layout.t(p + "out.0.bias", BASE)
    layout.t(p + "out.2.weight", 3, BASE, 3, 3), layout.t(p + "out.2.bias", 3)
    encoder = upstream_trunk(layout, p + "encoder.", ENC_MULT, 1, False, False)
    ch = encoder[3]
    layout.t(p + "encoder.out.0.weight", ch, norm=True), layout.t(p + "encoder.out.0.bias", ch)
    layout.t(p + "encoder.out.3.weight", ZDIM, ch, 1, 1), layout.t(p + "encoder.out.3.bias", ZDIM)
    if latent:  # MLPSkipNet: 3 layers, hidden 32, skip into layers 1 and 2, time features 8
        q = p + "latent_net."
        layout.t(q + "time_embed.0.weight", ZDIM, 8), layout.t(q + "time_embed.0.bias", ZDIM)
        layout.t(q + "time_embed.2.weight", ZDIM, ZDIM), layout.t(q + "time_embed.2.bias", ZDIM)
        for i, (cin, cout) in enumerate([(ZDIM, 32), (32 + ZDIM, 32), (32 + ZDIM, ZDIM)]):
            layout.t(f"{q}layers.{i}.linear.weight", cout, cin), layout.t(f"{q}layers.{i}.linear.bias", cout)
            if i < 2:
                layout.t(f"{q}layers.{i}.linear_emb.weight", cout, ZDIM), layout.t(f"{q}layers.{i}.linear_emb.bias", cout)
                for name in ("weight", "bias"):  # upstream registers linear_emb twice
                    layout.sd[f"{q}layers.{i}.cond_layers.1.{name}"] = layout.sd[f"{q}layers.{i}.linear_emb.{name}"]
                layout.t(f"{q}layers.{i}.norm.weight", cout, norm=True), layout.t(f"{q}layers.{i}.norm.bias", cout)
    return layout.sd, unet, encoder


# ----------------------------------------------------------------------------- upstream forward
def gn(sd, p, x):
    return F.group_norm(x.float(), min(32, x.shape[1]), sd[p + "weight"], sd[p + "bias"])


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def res_forward(sd, p, x, emb, cond, updown):
    h = F.silu(gn(sd, p + "in_layers.0.", x))
    if updown == "up":
        h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    elif updown == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = F.conv2d(h, sd[p + "in_layers.2.weight"], sd[p + "in_layers.2.bias"], padding=1)
    if emb is not None:
        scale, shift = F.linear(F.silu(emb), sd[p + "emb_layers.1.weight"], sd[p + "emb_layers.1.bias"]).chunk(2, 1)
        zscale = F.linear(F.silu(cond), sd[p + "cond_emb_layers.1.weight"], sd[p + "cond_emb_layers.1.bias"])
        h = gn(sd, p + "out_layers.0.", h)
        h = h * (1 + scale[..., None, None]) + shift[..., None, None]
        h = h * (1 + zscale[..., None, None])
        h = F.conv2d(F.silu(h), sd[p + "out_layers.3.weight"], sd[p + "out_layers.3.bias"], padding=1)
    if p + "skip_connection.weight" in sd:
        x = F.conv2d(x, sd[p + "skip_connection.weight"], sd[p + "skip_connection.bias"])
    return x + h


def attn_forward(sd, p, x):
    b, c, height, width = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(gn(sd, p + "norm.", x), sd[p + "qkv.weight"], sd[p + "qkv.bias"])
    ch = c // HEADS
    q, k, v = qkv.reshape(b * HEADS, 3 * ch, -1).split(ch, dim=1)  # legacy: heads first, then q/k/v
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, x.shape[-1])
    return (x + F.conv1d(a, sd[p + "proj_out.weight"], sd[p + "proj_out.bias"])).reshape(b, c, height, width)


def run_ops(sd, ops, h, emb, cond):
    for kind, p, updown in ops:
        h = res_forward(sd, p, h, emb, cond, updown) if kind == "res" else attn_forward(sd, p, h)
    return h


def upstream_unet(sd, blocks, x, t, cond, p="ema_model."):
    down, mid, up, _ = blocks
    emb = timestep_embedding(t, BASE)
    emb = F.linear(F.silu(F.linear(emb, sd[p + "time_embed.time_embed.0.weight"], sd[p + "time_embed.time_embed.0.bias"])),
                   sd[p + "time_embed.time_embed.2.weight"], sd[p + "time_embed.time_embed.2.bias"])
    h = F.conv2d(x, sd[p + "input_blocks.0.0.weight"], sd[p + "input_blocks.0.0.bias"], padding=1)
    hs = [h]
    for ops in down:
        h = run_ops(sd, ops, h, emb, cond)
        hs.append(h)
    h = run_ops(sd, mid, h, emb, cond)
    for ops in up:
        h = run_ops(sd, ops, torch.cat([h, hs.pop()], dim=1), emb, cond)
    return F.conv2d(F.silu(gn(sd, p + "out.0.", h)), sd[p + "out.2.weight"], sd[p + "out.2.bias"], padding=1)


def upstream_encoder(sd, blocks, x, p="ema_model.encoder."):
    down, mid, _, _ = blocks
    h = F.conv2d(x, sd[p + "input_blocks.0.0.weight"], sd[p + "input_blocks.0.0.bias"], padding=1)
    for ops in down:
        h = run_ops(sd, ops, h, None, None)
    h = run_ops(sd, mid, h, None, None)
    h = F.adaptive_avg_pool2d(F.silu(gn(sd, p + "out.0.", h)), 1)
    return F.conv2d(h, sd[p + "out.3.weight"], sd[p + "out.3.bias"]).flatten(1)


def upstream_latent(sd, z, t, p="ema_model.latent_net."):
    temb = timestep_embedding(t, 8)
    temb = F.linear(F.silu(F.linear(temb, sd[p + "time_embed.0.weight"], sd[p + "time_embed.0.bias"])),
                    sd[p + "time_embed.2.weight"], sd[p + "time_embed.2.bias"])
    h = z
    for i in range(3):
        if i in (1, 2):
            h = torch.cat([h, z], dim=1)
        h = F.linear(h, sd[f"{p}layers.{i}.linear.weight"], sd[f"{p}layers.{i}.linear.bias"])
        if i < 2:
            c = F.linear(F.silu(temb), sd[f"{p}layers.{i}.linear_emb.weight"], sd[f"{p}layers.{i}.linear_emb.bias"])
            h = F.layer_norm(h * (1 + c), (h.shape[1],), sd[f"{p}layers.{i}.norm.weight"], sd[f"{p}layers.{i}.norm.bias"])
            h = F.silu(h)
    return h


# ----------------------------------------------------------------------------- Lightning-like file
@pytest.fixture
def lightning_ckpt(tmp_path):
    ema, unet_blocks, encoder_blocks = build_upstream_state_dict("ema_model.", seed=0)
    raw, _, _ = build_upstream_state_dict("model.", seed=1)  # different raw weights: must be ignored
    state = {**ema, **raw}
    state["x_T"] = torch.randn(4, 3, IMAGE, IMAGE)
    state["conds_mean"] = torch.randn(1, ZDIM)
    state["conds_std"] = torch.rand(1, ZDIM) + 0.5

    # PL 1.4 keys ``callbacks`` by the callback class object: fake that class's module.
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    fakes = {"pytorch_lightning": types.ModuleType("pytorch_lightning"),
             "pytorch_lightning.callbacks": types.ModuleType("pytorch_lightning.callbacks"),
             module.__name__: module}
    assert not set(fakes) & set(sys.modules)
    sys.modules.update(fakes)
    try:
        checkpoint = {
            "epoch": 3,
            "global_step": 1234,
            "pytorch-lightning_version": "1.4.5",
            "state_dict": state,
            "callbacks": {ModelCheckpoint: {"best_model_score": None, "dirpath": "checkpoints"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
            "lr_schedulers": [],
            "hyper_parameters": dict(HPARAMS),
        }
        path = tmp_path / "last.ckpt"
        torch.save(checkpoint, path)
    finally:
        for name in fakes:
            del sys.modules[name]
    with pytest.raises(Exception):  # plain weights_only loading refuses the class-keyed callbacks
        torch.load(path, weights_only=True)
    return path, state, unet_blocks, encoder_blocks


def test_convert_strict_and_numerically_identical(lightning_ckpt, tmp_path):
    path, state, unet_blocks, encoder_blocks = lightning_ckpt
    out = tmp_path / "converted"
    convert_diffae_checkpoint(path, out)
    pipe = DiffAEPipeline.from_pretrained(out)
    assert pipe.unet.config.num_attention_heads == HEADS and pipe.unet.config.sample_size == IMAGE
    assert tuple(pipe.unet.config.channel_mult) == UNET_MULT and tuple(pipe.semantic_encoder.config.channel_mult) == ENC_MULT
    assert tuple(pipe.unet.config.attention_resolutions) == ATTN
    assert len(pipe.unet.attn_processors) == 4  # 1 down, 1 mid, 2 up at 8x8

    g = torch.Generator().manual_seed(5)
    x, z = torch.randn(2, 3, IMAGE, IMAGE, generator=g), torch.randn(2, ZDIM, generator=g)
    t = torch.tensor([3, 777])
    with torch.no_grad():
        ours = pipe.unet(x, t, z).sample
        reference = upstream_unet(state, unet_blocks, x, t, z)
        assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
        assert torch.allclose(pipe.semantic_encoder(x), upstream_encoder(state, encoder_blocks, x), atol=1e-5)
        assert torch.allclose(pipe.latent_net(z, t), upstream_latent(state, z, t), atol=1e-5)
    assert torch.equal(pipe.latent_net.conds_mean, state["conds_mean"].reshape(-1))
    assert torch.equal(pipe.latent_net.conds_std, state["conds_std"].reshape(-1))
    # the raw (non-EMA) weights were not taken
    assert not torch.allclose(pipe.unet.conv_in.weight, state["model.input_blocks.0.0.weight"])


def test_convert_raw_weights_and_overwrite_guard(lightning_ckpt, tmp_path):
    path, state, _, _ = lightning_ckpt
    pipe = convert_diffae_checkpoint(path, tmp_path / "raw", prefix="model.")
    assert torch.equal(pipe.unet.conv_in.weight, state["model.input_blocks.0.0.weight"])
    with pytest.raises(FileExistsError, match="not empty"):
        convert_diffae_checkpoint(path, tmp_path / "raw")


def test_autoencoder_without_latent_net(tmp_path):
    state, _, _ = build_upstream_state_dict(latent=False)
    path = tmp_path / "autoenc.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, path)  # no hyper_parameters: image_size given
    pipe = convert_diffae_checkpoint(path, tmp_path / "out", image_size=IMAGE)
    assert pipe.latent_net is None and pipe.latent_scheduler is None
    assert tuple(pipe.unet.config.attention_resolutions) == ATTN


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callbacks": {"x": Payload()}}, path)
    with pytest.raises(ValueError, match="system.*refusing"):
        load_upstream_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_upstream_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="junk.ckpt"):
        load_upstream_checkpoint(tmp_path / "junk.ckpt")


def test_wrong_keys_give_clear_errors(tmp_path):
    def convert(state, name):
        path = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": state, "hyper_parameters": dict(HPARAMS)}, path)
        return convert_diffae_checkpoint(path, tmp_path / name)

    state, _, _ = build_upstream_state_dict()
    extra = dict(state, **{"ema_model.input_blocks.1.0.mystery.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="mystery"):
        convert(extra, "extra")
    missing = {k: v for k, v in state.items() if not k.startswith("ema_model.middle_block.2.out_layers.3")}
    with pytest.raises(ValueError, match="missing.*mid_block.resnet_2.conv2"):
        convert(missing, "missing")
    twin = dict(state)
    twin["ema_model.latent_net.layers.0.cond_layers.1.weight"] = torch.zeros_like(
        state["ema_model.latent_net.layers.0.linear_emb.weight"]
    )
    with pytest.raises(ValueError, match="same tensor"):
        convert(twin, "twin")
    with pytest.raises(ValueError, match="no 'ema_model"):
        convert({"x_T": torch.zeros(1)}, "empty")
    with pytest.raises(ValueError, match="unexpected top-level key 'optimizer'"):
        convert(dict(state, optimizer=torch.zeros(1)), "top")


def test_cli_convert_diffae(lightning_ckpt, tmp_path, capsys):
    from ipl_diffusion.cli import convert

    parser = argparse.ArgumentParser(prog="ipl")
    sub = parser.add_subparsers(dest="command")
    convert.add_parser(sub).set_defaults(_run=convert.run)
    path = lightning_ckpt[0]
    args = parser.parse_args(["convert", "diffae", "--checkpoint", str(path), "--output", str(tmp_path / "cli")])
    assert args._run(args) == 0
    assert (tmp_path / "cli" / "model_index.json").is_file()
    assert "DiffAEPipeline" in capsys.readouterr().out
    args = parser.parse_args(["convert", "diffae", "--checkpoint", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        args._run(args)


def test_full_size_upstream_layout_maps_onto_default_models(monkeypatch):
    """The ffhq256_autoenc layout (706 tensors, 168,492,291 parameters) on the meta device."""
    import test_conversion_diffae as here

    from ipl_diffusion.conversion import diffae as conversion
    from ipl_diffusion.models import DiffAEUNetModel, SemanticEncoder

    for name, value in dict(IMAGE=256, BASE=128, EMBED=512, ZDIM=512, UNET_MULT=(1, 1, 2, 2, 4, 4),
                            ENC_MULT=(1, 1, 2, 2, 4, 4, 4), ATTN=(16,)).items():
        monkeypatch.setattr(here, name, value)
    layout, p = here.Layout(None), "ema_model."
    layout.t(p + "time_embed.time_embed.0.weight", 512, 128), layout.t(p + "time_embed.time_embed.0.bias", 512)
    layout.t(p + "time_embed.time_embed.2.weight", 512, 512), layout.t(p + "time_embed.time_embed.2.bias", 512)
    here.upstream_trunk(layout, p, here.UNET_MULT, 2, True, True)
    layout.t(p + "out.0.weight", 128), layout.t(p + "out.0.bias", 128)
    layout.t(p + "out.2.weight", 3, 128, 3, 3), layout.t(p + "out.2.bias", 3)
    here.upstream_trunk(layout, p + "encoder.", here.ENC_MULT, 2, False, False)
    layout.t(p + "encoder.out.0.weight", 512), layout.t(p + "encoder.out.0.bias", 512)
    layout.t(p + "encoder.out.3.weight", 512, 512, 1, 1), layout.t(p + "encoder.out.3.bias", 512)
    assert len(layout.sd) == 706 and sum(v.numel() for v in layout.sd.values()) == 168_492_291

    unet = {k[len(p):]: v for k, v in layout.sd.items() if not k.startswith(p + "encoder.")}
    encoder = {k[len(p + "encoder."):]: v for k, v in layout.sd.items() if k.startswith(p + "encoder.")}
    with torch.device("meta"):
        defaults = DiffAEUNetModel(), SemanticEncoder()
    for infer, convert, upstream, default in (
        (conversion.infer_unet_config, conversion.convert_unet_state_dict, unet, defaults[0]),
        (conversion.infer_encoder_config, conversion.convert_encoder_state_dict, encoder, defaults[1]),
    ):
        config = infer(upstream, {})  # no hyper_parameters: upstream defaults
        assert all(tuple(v) == tuple(default.config[k]) if isinstance(v, tuple) else v == default.config[k]
                   for k, v in config.items())
        ours = {k: tuple(v.shape) for k, v in default.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in convert(upstream).items()} == ours


def test_cli_convert_stylegan2_dispatches(monkeypatch, tmp_path, capsys):
    import ipl_diffusion.conversion.stylegan2 as stylegan2_conversion
    from ipl_diffusion.cli import convert

    calls = []
    monkeypatch.setattr(
        stylegan2_conversion, "convert_stylegan2_checkpoint", lambda checkpoint, output_dir, overwrite: calls.append((checkpoint, output_dir, overwrite)) or output_dir
    )
    parser = argparse.ArgumentParser(prog="ipl")
    convert.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "stylegan2", "--checkpoint", "g.pt", "--output", str(tmp_path)])
    assert convert.run(args) == 0
    assert calls == [("g.pt", str(tmp_path), False)] and "StyleGAN2Generator" in capsys.readouterr().out
