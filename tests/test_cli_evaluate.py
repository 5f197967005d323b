"""``ipl evaluate`` end to end on files: pairing, odd images, clear errors, JSON/CSV output."""

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ipl_diffusion.cli import evaluate as evaluate_cli

PROCESSOR = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
             "crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}}


def parse(argv):
    parser = argparse.ArgumentParser(prog="ipl")
    sub = parser.add_subparsers(dest="command")
    evaluate_cli.add_parser(sub)
    return parser.parse_args(["evaluate", *argv])


def run_cli(argv):
    return evaluate_cli.run(parse(argv))


def write_images(folder, names, seed, modes=None):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        mode = (modes or ["RGB"] * len(names))[i]
        if mode == "RGBA":
            image = Image.fromarray(rng.integers(0, 256, (40, 48, 4), dtype=np.uint8), "RGBA")
        elif mode == "L":
            image = Image.fromarray(rng.integers(0, 256, (50, 36), dtype=np.uint8), "L")
        elif mode == "I;16":
            image = Image.fromarray(rng.integers(0, 65536, (36, 36), dtype=np.uint16))
        else:
            image = Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8), "RGB")
        image.save(folder / name)


@pytest.fixture
def clip_folder(tiny_clip, tmp_path):
    from transformers import CLIPImageProcessor

    model, tokenizer = tiny_clip
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(**PROCESSOR).save_pretrained(folder)
    return folder


def test_clip_and_diversity_metrics_from_folders(clip_folder, tmp_path):
    names = ["a.png", "b.png", "c.png", "d.png"]
    write_images(tmp_path / "src", ["a.jpg", "b.png", "c.png", "d.png"], 0, ["RGB", "RGBA", "L", "I;16"])
    write_images(tmp_path / "dst", names, 1)
    write_images(tmp_path / "refs", ["r1.png", "r2.png"], 2)
    out_json, out_csv = tmp_path / "res.json", tmp_path / "res.csv"
    assert run_cli([
        "--source", str(tmp_path / "src"), "--adapted", str(tmp_path / "dst"), "--reference", str(tmp_path / "refs"),
        "--clip-model", str(clip_folder), "--source-label", "photo", "--target-label", "sketch", "--size", "32",
        "--diversity-network", "clip", "--identity-network", "clip", "--clip-templates", "single",
        "--json", str(out_json), "--csv", str(out_csv),
    ]) == 0
    result = json.loads(out_json.read_text())
    rows = {r["metric"]: r for r in result["metrics"]}
    assert set(rows) == {"clip_score", "clip_direction", "id", "pairwise_lpips", "intra_lpips"}
    assert "CLIP image features" in rows["id"]["note"] and "not LPIPS" in rows["pairwise_lpips"]["note"]
    assert "Inception" in result["skipped"]["is"] and "--hed-weights" in result["skipped"]["scs"]
    assert set(result["per_image"]) == set(names)

    # Same numbers as the library functions on images loaded through ipl_diffusion.images.
    from ipl_diffusion.clip_text import CLIPPromptEncoder
    from ipl_diffusion.images import load_images
    from ipl_diffusion.metrics import FeatureDistance, clip_directional_similarity, identity_similarity, mean_pairwise_distance

    encoder = CLIPPromptEncoder.from_pretrained(str(clip_folder))
    source = load_images([tmp_path / "src" / n for n in ["a.jpg", "b.png", "c.png", "d.png"]], 32)[0]
    adapted = load_images(tmp_path / "dst", 32)[0]
    t_s, t_t = (encoder.label_features(label, templates="single") for label in ("photo", "sketch"))
    direction = clip_directional_similarity(source, adapted, t_s, t_t, encoder.encode_images)
    assert rows["clip_direction"]["value"] == pytest.approx(direction.mean().item(), abs=1e-5)
    assert result["per_image"]["b.png"]["clip_direction"] == pytest.approx(direction[1].item(), abs=1e-5)
    pairwise = mean_pairwise_distance(adapted, FeatureDistance(encoder.encode_images))
    assert rows["pairwise_lpips"]["value"] == pytest.approx(pairwise, abs=1e-5)
    id_sim = identity_similarity(source, adapted, encoder.encode_images)
    assert result["per_image"]["c.png"]["id"] == pytest.approx(id_sim[2].item(), abs=1e-5)
    with open(out_csv) as handle:
        table = list(csv.DictReader(handle))
    assert [r["metric"] for r in table] == [r["metric"] for r in result["metrics"]]


def test_unpaired_names_empty_folders_and_missing_inputs_are_clear_errors(tmp_path, clip_folder):
    write_images(tmp_path / "src", ["a.png", "b.png"], 0)
    write_images(tmp_path / "dst", ["a.png", "c.png"], 1)
    with pytest.raises(ValueError, match=r"same file names.*\['c'\].*\['b'\]"):
        run_cli(["--source", str(tmp_path / "src"), "--adapted", str(tmp_path / "dst")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--adapted: no image files found"):
        run_cli(["--adapted", str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="--source: image folder .* does not exist"):
        run_cli(["--source", str(tmp_path / "nope"), "--adapted", str(tmp_path / "dst")])
    # An explicitly requested metric names what it needs.
    with pytest.raises(ValueError, match=r"scs needs paired source images \(--source\) and the HED weights"):
        run_cli(["--adapted", str(tmp_path / "dst"), "--metrics", "scs"])
    # Too few samples for the Inception Score splits (checked before any weights are needed).
    with pytest.raises(ValueError, match=r"is needs the Inception-v3 weights"):
        run_cli(["--adapted", str(tmp_path / "dst"), "--metrics", "is"])
    with pytest.raises(ValueError, match="unknown"):
        run_cli(["--adapted", str(tmp_path / "dst"), "--metrics", "fidd"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        run_cli(["--adapted", str(tmp_path / "dst")])
    with pytest.raises(ValueError, match="clip_direction needs .*--source-label"):
        run_cli(["--adapted", str(tmp_path / "dst"), "--source", str(tmp_path / "dst"), "--clip-model",
                 str(clip_folder), "--target-label", "sketch", "--metrics", "clip_direction"])


def test_missing_weights_file_and_offline_hub_id_fail_before_images_are_read(tmp_path, monkeypatch):
    write_images(tmp_path / "dst", ["a.png", "b.png"], 1)
    with pytest.raises(FileNotFoundError, match="HED edge detector .*does not exist"):
        run_cli(["--adapted", str(tmp_path / "dst"), "--hed-weights", str(tmp_path / "hed.pytorch")])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="CLIP model .*offline") as error:
        run_cli(["--adapted", str(tmp_path / "dst"), "--clip-model", "openai/clip-vit-base-patch32-not-cached"])
    # the advice is the command's own flag, not the Python API
    assert str(error.value).startswith("--clip-model: ") and "e.g. `--clip-model ./clip`." in str(error.value)
    assert "CLIPPromptEncoder.from_pretrained" not in str(error.value)


def test_ipl_main_turns_user_errors_into_one_line_and_exit_code_2(tmp_path, capsys):
    from ipl_diffusion.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--adapted", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ipl evaluate: error: --adapted: no image files found")


def _save_random(module, path):
    torch.save(module.state_dict(), path)
    return str(path)


@pytest.mark.slow
def test_paper_metrics_with_random_networks_in_their_published_layouts(tmp_path):
    from ipl_diffusion.metrics import HED, IRSE50, LPIPS, InceptionV3

    torch.manual_seed(0)
    inception = _save_random(InceptionV3("torchvision"), tmp_path / "inception_v3_google-0cc3c7bd.pth")
    hed_state = {k.replace("net", "module", 1): v for k, v in HED().state_dict().items()}
    torch.save(hed_state, tmp_path / "network-bsds500.pytorch")
    arcface = _save_random(IRSE50(), tmp_path / "model_ir_se50.pth")
    lpips = LPIPS("alex")
    alex = {f"features.{k}": v for k, v in lpips.features.state_dict().items()}
    torch.save(alex, tmp_path / "alexnet-owt-7be5be79.pth")
    # LPIPS' own weights/v0.1/alex.pth layout (no torchmetrics needed for the default copy)
    torch.save({k: v for k, v in lpips.state_dict().items() if k.startswith("lin")}, tmp_path / "alex.pth")

    names = ["0.png", "1.png", "2.png"]
    write_images(tmp_path / "src", names, 0)
    write_images(tmp_path / "dst", names, 1)
    write_images(tmp_path / "refs", ["R1.png", "R2.png"], 2)
    out = tmp_path / "res.json"
    assert run_cli([
        "--source", str(tmp_path / "src"), "--adapted", str(tmp_path / "dst"), "--reference", str(tmp_path / "refs"),
        "--size", "96", "--splits", "3", "--inception-weights", inception,
        "--hed-weights", str(tmp_path / "network-bsds500.pytorch"), "--arcface-weights", arcface,
        "--lpips-backbone-weights", str(tmp_path), "--lpips-lin-weights", str(tmp_path / "alex.pth"),
        "--json", str(out),
    ]) == 0
    rows = {r["metric"]: r for r in json.loads(out.read_text())["metrics"]}
    # (FID / KID are left out here: a 2048x2048 eigen-decomposition takes about a minute on 2 CPU
    # cores; their formulas are checked in test_metrics_diversity.py and the layout in
    # test_metrics_inception.py.)
    assert set(rows) == {"is", "sifid[R1.png]", "sifid[R2.png]", "sifid", "scs", "id", "pairwise_lpips", "intra_lpips"}
    assert 1.0 <= rows["is"]["value"] <= 3.0  # IS lies in [1, number of images per split]
    assert 0.0 <= rows["scs"]["value"] <= 1.0 and -1.0 <= rows["id"]["value"] <= 1.0
    assert rows["sifid"]["value"] == pytest.approx((rows["sifid[R1.png]"]["value"] + rows["sifid[R2.png]"]["value"]) / 2)


def test_read_only_json_or_csv_is_refused_before_any_work(tmp_path, read_only_dir, monkeypatch, capsys):
    from ipl_diffusion.cli import main
    from ipl_diffusion.metrics.suite import MetricNetworks

    def no_networks(*args, **kwargs):
        raise AssertionError("networks were built before --json / --csv was checked")

    monkeypatch.setattr(MetricNetworks, "from_weights", no_networks)
    write_images(tmp_path / "dst", ["a.png", "b.png"], 1)
    for flag in ("--json", "--csv"):
        assert main(["evaluate", "--adapted", str(tmp_path / "dst"), flag, str(read_only_dir / "res.out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ipl evaluate: error: {flag} {read_only_dir / 'res.out'}: its folder") and "not writable" in err


@pytest.mark.slow
def test_inception_score_of_32_px_images_resizes_them(tmp_path):
    from ipl_diffusion.metrics import InceptionV3

    torch.manual_seed(0)
    inception = _save_random(InceptionV3("torchvision"), tmp_path / "inception_v3_google-0cc3c7bd.pth")
    write_images(tmp_path / "dst", ["0.png", "1.png"], 1)
    out = tmp_path / "res.json"
    assert run_cli(["--adapted", str(tmp_path / "dst"), "--size", "32", "--splits", "2", "--metrics", "is",
                    "--inception-weights", inception, "--json", str(out)]) == 0
    row = json.loads(out.read_text())["metrics"][0]
    assert row["metric"] == "is" and 1.0 <= row["value"] <= 2.0
    assert "resized to 299 px (Inception needs >= 75)" in row["note"]
