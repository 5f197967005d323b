"""examples/shapes/train_diffae.py on a tiny config: v-prediction recorded in the scheduler,
warm start from a trained folder, and a clear refusal of a folder that does not fit."""

import json

import pytest
import torch

from ipl_diffusion.pipelines.pipeline_diffae import DiffAEPipeline
from repo_scripts import load_script

TINY = [
    "--resolution", "16", "--model_channels", "32", "--z_sem_channels", "16", "--latent_hidden", "32",
    "--latent_layers", "3", "--latent_pool", "64", "--latent_batch_size", "16", "--batch_size", "2",
    "--eval_steps", "3", "--checkpointing_steps", "100", "--oracle", "no-oracle",
]

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny latency-bound models (conftest.py)


@pytest.fixture(scope="module")
def script():
    return load_script("examples/shapes/train_diffae.py")


@pytest.fixture(scope="module")
def trained(script, tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_diffae")
    script.main(TINY + ["--max_steps", "3", "--latent_steps", "3", "--work_dir", str(root / "work"), "--output_dir", str(root / "out")])
    return root / "out"


def test_v_prediction_run_writes_a_loadable_pipeline(trained):
    pipe = DiffAEPipeline.from_pretrained(trained)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    record = json.loads((trained / "training_record.json").read_text())
    assert record["autoencoder"]["steps"] == 3 and record["config"]["prediction_type"] == "v_prediction"
    assert record["evaluation"]["reconstruction_mse"] >= 0


def test_warm_start_copies_encoder_and_unet(script, trained, tmp_path):
    out = tmp_path / "out"
    script.main(TINY + ["--max_steps", "0", "--latent_steps", "1", "--init_from", str(trained),
                        "--work_dir", str(tmp_path / "work"), "--output_dir", str(out)])
    before, after = DiffAEPipeline.from_pretrained(trained), DiffAEPipeline.from_pretrained(out)
    for name in ("unet", "semantic_encoder"):
        a, b = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_warm_start_from_a_folder_of_another_config_is_refused(script, trained, tmp_path):
    args = TINY + ["--z_sem_channels", "24"]  # argparse keeps the last value
    with pytest.raises(ValueError, match=r"--init_from .* does not fit .* keys missing, extra or of another shape, e\.g\. ") as err:
        script.main(args + ["--max_steps", "1", "--init_from", str(trained), "--work_dir", str(tmp_path / "w"),
                            "--output_dir", str(tmp_path / "o")])
    assert "\n" not in str(err.value) and len(str(err.value)) < 400  # one line, not torch's list of every key
    assert not (tmp_path / "o").exists()


def test_prediction_type_follows_the_checkpoint(script, tmp_path):
    where = ["--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "out")]
    script.main(TINY + ["--prediction_type", "epsilon", "--phase", "autoencoder", "--max_steps", "1"] + where)
    # resuming an eps checkpoint under the (v-prediction) default would switch objectives mid-run
    with pytest.raises(ValueError, match="trained with --prediction_type epsilon"):
        script.main(TINY + ["--phase", "autoencoder", "--max_steps", "2"] + where)
    # the latent phase saves the scheduler of what the autoencoder was trained to predict
    script.main(TINY + ["--phase", "latent", "--latent_steps", "1"] + where)
    assert DiffAEPipeline.from_pretrained(tmp_path / "out").scheduler.config.prediction_type == "epsilon"
    record = json.loads((tmp_path / "out" / "training_record.json").read_text())
    assert record["autoencoder"]["config"]["prediction_type"] == "epsilon"


def test_warm_started_run_records_the_run_it_started_from(script, trained, tmp_path):
    script.main(TINY + ["--max_steps", "1", "--latent_steps", "1", "--init_from", str(trained),
                        "--work_dir", str(tmp_path / "work"), "--output_dir", str(tmp_path / "out")])
    record = json.loads((tmp_path / "out" / "training_record.json").read_text())
    assert record["warm_start"]["init_from"] == str(trained)
    assert record["warm_start"]["record"]["autoencoder"]["steps"] == 3
