"""benchmarks/table1.py end to end on tiny models: a tiny StyleGAN2 + tiny CLIP adapted with NADA
and IPL, scored with randomly initialised metric networks of the real architectures (a small
IR-SE variant for ID), checked against ``ipl evaluate`` on the saved samples."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from repo_scripts import load_script

FAST = dict(stage1_num_images=8, stage1_iterations=2, stage1_batch_size=4, iterations=2, auto_layer_batch=2, num_sample_images=3,
            label_templates="single", progress=False)


def load_table1():
    return load_script("benchmarks/table1.py")


def test_paper_numbers_and_layout():
    table1 = load_table1()
    assert len(table1.TABLE1) == 10
    first, cubism = table1.TABLE1[0], table1.TABLE1[-1]
    assert (first.dataset, first.name) == ("FFHQ", "Photo→Disney")
    assert first.paper("is", "IPL") == 3.089 and first.paper("sifid_R3", "NADA") == 3.670
    assert cubism.paper("id", "NADA") == 0.934 and cubism.paper("sifid_R2", "IPL") == 2.956
    assert table1.TABLE1[3].slug == "ukiyo-e" and table1.TABLE1[1].slug == "anime_painting"
    text = table1.format_table1([{"setting": first, "ours": {"NADA": {"is": 1.5}, "IPL": {}}}])
    header, rule, row = text.splitlines()[:3]
    assert header.split()[:4] == ["Dataset", "Source→Target", "IS", "NADA"]
    assert "1.500 (2.721)" in row and "n/a (3.089)" in row and "n/a (2.517)" in row
    assert [s.target for s in table1.select_settings("1,cubism", {"FFHQ", "AFHQ"})] == ["Disney", "Cubism"]
    with pytest.raises(ValueError, match="needs --afhq-generator"):
        table1.select_settings("8", {"FFHQ"})


@pytest.mark.slow
def test_protocol_end_to_end_on_tiny_models(tiny_clip, tmp_path):
    from transformers import CLIPImageProcessor

    from ipl_diffusion.cli import evaluate as evaluate_cli
    from ipl_diffusion.metrics import HED, IRSE50, ArcFaceFeatures, InceptionV3
    from ipl_diffusion.metrics.suite import MetricNetworks
    from ipl_diffusion.models.stylegan2 import StyleGAN2Generator
    from ipl_diffusion.pipelines.pipeline_stylegan_ipl import StyleGANIPLPipeline

    table1 = load_table1()
    clip, tokenizer = tiny_clip
    torch.manual_seed(0)
    generator = StyleGAN2Generator(size=32, style_dim=16, n_mlp=2, channel_max=8).eval()
    pipe = StyleGANIPLPipeline.from_components(generator, clip, tokenizer, CLIPImageProcessor())
    inception, hed = InceptionV3(), HED()
    nets = MetricNetworks(inception=inception, hed=hed)
    identity = ArcFaceFeatures(IRSE50(stages=((16, 16, 1), (16, 32, 1)), embedding_dim=8))
    refs = tmp_path / "refs" / "disney"
    refs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(refs / f"R{k + 1}.png")
    settings = table1.select_settings("1", {"FFHQ"})
    references = table1.load_references(tmp_path / "refs", settings)
    results = table1.run_table1(
        {"FFHQ": pipe}, nets, settings, identity_by_dataset={"FFHQ": identity}, references=references,
        protocol=table1.Protocol(num_samples=4, num_pairs=3, splits=2, eval_size=80, batch_size=4), adapt_kwargs=FAST,
        output_dir=tmp_path / "out", log=lambda *a: None,
    )
    ours = results[0]["ours"]
    assert set(ours) == {"NADA", "IPL"}
    for row in ours.values():
        assert 1.0 <= row["is"] <= 2.0 and 0.0 <= row["scs"] <= 1.0 and -1.0 <= row["id"] <= 1.0
        assert all(row[f"sifid_R{k}"] >= 0 for k in (1, 2, 3))
    assert ours["NADA"] != ours["IPL"]  # the two schemes give different generators
    text = table1.format_table1(results)
    assert "Photo→Disney" in text and "(2.721)" in text

    # The saved samples re-scored by `ipl evaluate` give the same numbers (same image path).
    weights = tmp_path / "w"
    weights.mkdir()
    torch.save(inception.state_dict(), weights / "inception_v3_google-0cc3c7bd.pth")
    torch.save({k.replace("net", "module", 1): v for k, v in hed.state_dict().items()}, weights / "network-bsds500.pytorch")
    base = tmp_path / "out" / "ffhq" / "disney"
    out_json = tmp_path / "ipl.json"
    parser = evaluate_cli.add_parser(__import__("argparse").ArgumentParser().add_subparsers())
    args = parser.parse_args([
        "--source", str(base / "source"), "--adapted", str(base / "ipl"), "--reference", str(refs), "--size", "80",
        "--splits", "2", "--inception-weights", str(weights), "--hed-weights", str(weights), "--metrics", "is,sifid,scs",
        "--json", str(out_json),
    ])
    assert evaluate_cli.run(args) == 0
    rows = {r["metric"]: r["value"] for r in json.loads(out_json.read_text())["metrics"]}
    assert rows["is"] == pytest.approx(ours["IPL"]["is"], rel=1e-4)
    assert rows["sifid[R2.png]"] == pytest.approx(ours["IPL"]["sifid_R2"], rel=1e-4)
    # SCS over all 4 pairs in `ipl evaluate`; the protocol used the first 3 (num_pairs).
    per_pair = json.loads(out_json.read_text())["per_image"]
    first3 = [per_pair[f"{i:05d}.png"]["scs"] for i in range(3)]
    assert sum(first3) / 3 == pytest.approx(ours["IPL"]["scs"], rel=1e-5)
