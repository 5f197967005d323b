"""Atomic, resumable safetensors checkpoints (ipl_diffusion.checkpointing)."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ipl_diffusion import checkpointing as ckpt


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.99))
    return model, optimizer


def _train(model, optimizer, steps, generator):
    for _ in range(steps):
        x = torch.randn(5, 4, generator=generator)
        noise = torch.randn(5, 2)  # global RNG: must be restored too
        loss = (model(x) - noise).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_resume_gives_identical_weights(tmp_path):
    # Uninterrupted: 6 steps.
    torch.manual_seed(1)
    model_a, opt_a = _model_and_optimizer()
    gen_a = torch.Generator().manual_seed(7)
    _train(model_a, opt_a, 6, gen_a)

    # Interrupted after 3 steps, checkpointed, "killed", resumed into fresh objects.
    torch.manual_seed(1)
    model_b, opt_b = _model_and_optimizer()
    gen_b = torch.Generator().manual_seed(7)
    _train(model_b, opt_b, 3, gen_b)
    ckpt.save_checkpoint(tmp_path, 3, {"net": model_b}, {"adam": opt_b}, config={"lr": 1e-2}, generators={"data": gen_b})
    torch.manual_seed(999)  # the new process has other RNG state
    np.random.seed(5)
    model_c, opt_c = _model_and_optimizer(seed=123)
    gen_c = torch.Generator().manual_seed(0)
    path = ckpt.resolve_checkpoint(tmp_path, "latest")
    step, config = ckpt.load_checkpoint(path, {"net": model_c}, {"adam": opt_c}, generators={"data": gen_c})
    assert step == 3 and config == {"lr": 1e-2}
    _train(model_c, opt_c, 3, gen_c)
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, model_c.state_dict()[key]), key
    exp_avg_a = opt_a.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(exp_avg_a, opt_c.state_dict()["state"][0]["exp_avg"])
    assert opt_c.param_groups[0]["betas"][1] == 0.99


def test_numpy_and_python_rng_restored(tmp_path):
    model, _ = _model_and_optimizer()
    np.random.seed(3)
    random.seed(3)
    ckpt.save_checkpoint(tmp_path, 1, {"net": model})
    expected = (np.random.rand(3), random.random())
    np.random.seed(100)
    random.seed(100)
    ckpt.load_checkpoint(tmp_path / "checkpoint-1", {"net": model})
    assert np.array_equal(np.random.rand(3), expected[0]) and random.random() == expected[1]


def test_files_are_safetensors_and_json_only(tmp_path):
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, 1, torch.Generator().manual_seed(0))
    path = ckpt.save_checkpoint(tmp_path, 1, {"net": model}, {"adam": optimizer})
    assert sorted(os.listdir(path)) == ["checkpoint.json", "state.safetensors"]
    tensors = load_file(str(path / "state.safetensors"))
    assert "model/net/0.weight" in tensors and "optimizer/adam/0/exp_avg" in tensors and "rng/torch" in tensors
    json.loads((path / "checkpoint.json").read_text())


def test_keep_latest_and_ignores_partial_writes(tmp_path):
    model, _ = _model_and_optimizer()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, {"net": model}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    # A killed write leaves a temp folder and maybe a folder without metadata: both ignored.
    (tmp_path / ".tmp-checkpoint-5-abc").mkdir()
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "state.safetensors").write_bytes(b"partial")
    assert ckpt.resolve_checkpoint(tmp_path, "latest").name == "checkpoint-4"
    # Re-saving an existing step replaces it atomically.
    ckpt.save_checkpoint(tmp_path, 4, {"net": model}, config={"again": True})
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-4", {"net": model})[1] == {"again": True}


def test_kill_during_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, _ = _model_and_optimizer()
    ckpt.save_checkpoint(tmp_path, 1, {"net": model})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, {"net": model})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_errors(tmp_path):
    model, _ = _model_and_optimizer()
    assert ckpt.resolve_checkpoint(tmp_path, "latest") is None
    assert ckpt.resolve_checkpoint(tmp_path, None) is None
    with pytest.raises(FileNotFoundError, match="checkpoint-7"):
        ckpt.resolve_checkpoint(tmp_path, "checkpoint-7")
    path = ckpt.save_checkpoint(tmp_path, 1, {"net": model})
    other = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="do not match"):
        ckpt.load_checkpoint(path, {"net": other})
    with pytest.raises(ValueError, match="no weights for model 'ema'"):
        ckpt.load_checkpoint(path, {"ema": model})


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    from ipl_diffusion.checkpointing import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    path = save_checkpoint(tmp_path, 1, {"m": model}, config={"target": "sketch"})
    state = path / "state.safetensors"
    state.write_bytes(state.read_bytes()[:20])  # cut short, as by a full disk
    with pytest.raises(ValueError, match="unreadable.*delete that folder"):
        load_checkpoint(path, {"m": model})


def test_resume_refuses_another_runs_checkpoint_and_fresh_runs_keep_old_ones(tmp_path):
    from ipl_diffusion.checkpointing import check_same_run, refuse_foreign_checkpoints, save_checkpoint

    saved = {"source": "photo", "target": "neon", "stage1": {"scheme": "adaptive"}, "stage2": {"learning_rate": 0.02, "iterations": 6}}
    # more iterations (extending a run) is the same run; another target is not
    check_same_run(tmp_path, saved, {**saved, "stage2": {"learning_rate": 0.02, "iterations": 60}})
    with pytest.raises(ValueError, match="target was 'neon' there, 'sketch' now"):
        check_same_run(tmp_path, saved, {**saved, "target": "sketch"})
    refuse_foreign_checkpoints(tmp_path / "checkpoints")  # none yet: fine
    save_checkpoint(tmp_path / "checkpoints", 6, {"m": torch.nn.Linear(2, 2)}, config=saved)
    with pytest.raises(ValueError, match="already holds checkpoints.*checkpoint-6"):
        refuse_foreign_checkpoints(tmp_path / "checkpoints")


def _flip_bit(path, offset_from_end=1):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01  # tensor data sits at the end of a safetensors file
    path.write_bytes(bytes(data))


def test_changed_checkpoint_files_are_refused_naming_the_file(tmp_path):
    from ipl_diffusion.errors import UserError

    model = torch.nn.Linear(2, 2)
    path = ckpt.save_checkpoint(tmp_path, 1, {"m": model}, config={"target": "sketch"})
    assert set(json.loads((path / "checkpoint.json").read_text())["sha256"]) == {"state.safetensors", "checkpoint.json"}
    ckpt.load_checkpoint(path, {"m": model})  # intact: loads
    _flip_bit(path / "state.safetensors")  # still a readable safetensors file, one weight changed
    with pytest.raises(UserError, match=r"checkpoint file .*checkpoint-1/state.safetensors does not match the sha256"):
        ckpt.load_checkpoint(path, {"m": torch.nn.Linear(2, 2)})
    path = ckpt.save_checkpoint(tmp_path, 2, {"m": model}, config={"target": "sketch"})
    meta = json.loads((path / "checkpoint.json").read_text())
    meta["config"]["target"] = "neon"  # an edit to the JSON is caught too
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"checkpoint-2/checkpoint.json does not match"):
        ckpt.load_checkpoint(path, {"m": model})
    del meta["sha256"]  # a checkpoint from before digests were recorded still loads
    (path / "checkpoint.json").write_text(json.dumps(meta))
    assert ckpt.load_checkpoint(path, {"m": model})[1] == {"target": "neon"}


def test_tensor_digest_names_the_changed_file(tmp_path):
    from ipl_diffusion.errors import UserError

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    digest = ckpt.tensors_sha256(tensors)
    ckpt.verify_tensors(tmp_path / "cache.safetensors", dict(tensors), {"sha256": digest})
    ckpt.verify_tensors(tmp_path / "cache.safetensors", tensors, {})  # written before digests: passes
    changed = {**tensors, "a": tensors["a"].clone().index_fill_(1, torch.tensor([2]), 7.0)}
    with pytest.raises(UserError, match=r"cache.safetensors does not match the sha256 digest"):
        ckpt.verify_tensors(tmp_path / "cache.safetensors", changed, {"sha256": digest})


def _run_loop(folder, stop_at, resume="latest", seed=0):
    """A training script's loop on :class:`ResumableRun`: runs until ``stop_at`` steps, then
    checkpoints, as the Shapes training scripts do."""
    model, optimizer = _model_and_optimizer(seed)
    data = torch.Generator().manual_seed(7)
    run = ckpt.ResumableRun(folder, {"net": model}, {"adam": optimizer}, {"data": data}, {"lr": 1e-2}, resume, name="the test")
    while run.running(stop_at):
        _train(model, optimizer, 1, data)
        run.step += 1
    return run, model, run.save()


def test_resumable_run_continues_a_killed_loop_to_the_same_weights(tmp_path, capsys):
    torch.manual_seed(1)
    _, whole, _ = _run_loop(tmp_path / "whole", 4)
    torch.manual_seed(1)
    first, _, first_elapsed = _run_loop(tmp_path / "split", 2)
    assert not first.resumed and first.step == 2
    torch.manual_seed(999)  # another process, other RNG state: the checkpoint brings it back
    second, split, elapsed = _run_loop(tmp_path / "split", 4, seed=5)
    assert second.resumed_from == tmp_path / "split" / "checkpoint-2" and second.step == 4
    assert "resumed the test from" in capsys.readouterr().out and second.saved_config["lr"] == 1e-2
    assert elapsed >= first_elapsed == second.elapsed_before  # wall time carried over
    for key, value in whole.state_dict().items():
        assert torch.equal(value, split.state_dict()[key]), key
    config = json.loads((tmp_path / "split" / "checkpoint-4" / ckpt.META_FILE).read_text())["config"]
    assert config["lr"] == 1e-2 and config["elapsed_seconds"] == elapsed
    # "none" (the scripts' flag value) starts afresh, and a bound on wall minutes stops the loop
    fresh, _, _ = _run_loop(tmp_path / "split", 0, resume="none")
    assert not fresh.resumed and fresh.step == 0 and not fresh.running(10, max_minutes=0)


def test_resume_refuses_another_domain_regulariser_and_reads_old_checkpoints_as_eq5(tmp_path):
    from ipl_diffusion.checkpointing import check_same_run

    old = {"source": "photo", "target": "neon", "stage1": {"scheme": "adaptive", "lambda_domain": 1.0}}  # before the option
    check_same_run(tmp_path, old, {**old, "stage1": {**old["stage1"], "domain_regularizer": "feature", "lambda_source": 0.0}})
    with pytest.raises(ValueError, match="stage1.domain_regularizer was 'feature' there, 'direction' now"):
        check_same_run(tmp_path, old, {**old, "stage1": {**old["stage1"], "domain_regularizer": "direction"}})
    with pytest.raises(ValueError, match="stage1.lambda_source was 0.0 there, 0.5 now"):
        check_same_run(tmp_path, old, {**old, "stage1": {**old["stage1"], "lambda_source": 0.5}})


def test_a_saved_stage1_result_from_before_an_option_existed_is_still_reused(tmp_path, monkeypatch):
    import json

    from ipl_diffusion.adaptation import stage1 as store
    from ipl_diffusion.configs import Stage1Config, as_dict
    from ipl_diffusion.prompt_learning import PromptLearner

    key = {"source": "photo", "target": "sketch", "seed": 0, "stage1": as_dict(Stage1Config())}
    folder = tmp_path / store.STAGE1_DIR
    folder.mkdir()
    old_stage1 = {k: v for k, v in key["stage1"].items() if k != "domain_regularizer"}
    (folder / "options.json").write_text(json.dumps({**key, "stage1": old_stage1}))
    monkeypatch.setattr(PromptLearner, "from_pretrained", classmethod(lambda cls, d, e: type("L", (), {"prompt_module": torch.nn.Identity()})()))
    encoder = type("E", (), {"device": "cpu"})()
    assert store.load_stage1(tmp_path, key, encoder) is not None  # the default then: the same options
    other = dict(key, stage1=dict(key["stage1"], domain_regularizer="direction"))
    assert store.load_stage1(tmp_path, other, encoder) is None  # another regulariser: trained again


# ----------------------------------------------------------- the output-folder rule


def _folder(root, *files):
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    return root


def _checkpoint(folder, step=7):
    """A complete checkpoint as list_checkpoints counts one (stand-in files, no digests)."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / ckpt.STATE_FILE).write_bytes(b"weights")
    (path / ckpt.META_FILE).write_text("{}")
    return path


@pytest.mark.parametrize(
    "files, checkpoint, resume, overwrite, refused",
    [
        ((), False, None, False, None),  # a new folder
        (("losses.csv",), False, None, False, "is not empty"),  # a user's file under a name the run writes
        (("losses.csv",), False, "latest", False, "is not empty"),  # nothing of this folder's to resume
        (("stage1/options.json", "cache.safetensors", "losses.csv"), False, "latest", False, None),  # stopped early
        (("stage1/options.json", "losses.csv"), False, None, False, "resume_from_checkpoint latest to continue"),
        (("stage1/options.json", "pipeline/model_index.json"), False, "latest", False, "earlier run"),  # finished
        (("pipeline/model_index.json",), True, "latest", False, None),  # resumes its own checkpoint
        (("losses.csv",), True, None, False, "already holds checkpoints"),  # a fresh run over them
        (("losses.csv",), True, "elsewhere", False, "is not empty"),  # another folder's checkpoint
        (("notes.txt", "pipeline/model_index.json"), True, None, True, None),  # --overwrite
        (("notes.txt",), True, "latest", True, None),  # --overwrite while resuming keeps the checkpoints
    ],
)
def test_the_output_folder_rule(tmp_path, files, checkpoint, resume, overwrite, refused):
    from ipl_diffusion.errors import UserError

    out = _folder(tmp_path / "out", *files)
    if checkpoint:
        _checkpoint(out / "checkpoints")
    if resume == "elsewhere":
        resume = str(_checkpoint(tmp_path / "other" / "checkpoints", 50))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    if refused:
        with pytest.raises(UserError, match=refused):
            ckpt.check_output_dir(out, resume, overwrite, ["pipeline"])
    else:
        ckpt.check_output_dir(out, resume, overwrite, ["pipeline"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # it only looks


def test_run_state_names_what_stage1_writes():
    from ipl_diffusion.adaptation.stage1 import STAGE1_DIR

    assert f"{STAGE1_DIR}/options.json" in ckpt.RUN_STATE


class _OneProcess:
    is_main_process = True

    def wait_for_everyone(self):
        pass


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_overwrite_replaces_the_earlier_checkpoints_unless_the_run_resumes_one(tmp_path):
    from ipl_diffusion.errors import UserError

    out, other = tmp_path / "out" / "checkpoints", tmp_path / "other" / "checkpoints"
    _checkpoint(out, 2), _checkpoint(out, 3), _checkpoint(other, 2)
    (out / "notes.txt").write_text("kept")
    foreign = str(other / "checkpoint-2")
    # Resuming another folder's checkpoint here: a fresh run for this folder. Refused without
    # overwrite (the API too: its rotation would mix the two runs' checkpoints) ...
    with pytest.raises(UserError, match="already holds checkpoints"):
        ckpt.check_before_run(out, foreign)
    # ... and with overwrite this folder's earlier checkpoints go (they used to stay, mixed in).
    ckpt.prepare_checkpoint_folder(out, foreign, None, True, _OneProcess())
    assert _files(out) == ["notes.txt"] and (other / "checkpoint-2").is_dir()
    # Resuming one of this folder's own keeps them all.
    _checkpoint(out, 2), _checkpoint(out, 3)
    before = _files(out)
    for resume in ("latest", str(out / "checkpoint-2")):
        ckpt.prepare_checkpoint_folder(out, resume, None, True, _OneProcess())
        assert _files(out) == before


def test_overwrite_deletes_all_or_none_and_says_why_in_one_line(tmp_path, monkeypatch):
    import shutil

    from ipl_diffusion.errors import UserError

    out = tmp_path / "out" / "checkpoints"
    first, second = _checkpoint(out, 2), _checkpoint(out, 3)
    before = _files(out)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != second and real_access(path, mode))
    with pytest.raises(UserError, match=r"cannot delete the earlier run's .*checkpoint-3 .*nothing was deleted"):
        ckpt.prepare_checkpoint_folder(out, None, None, True, _OneProcess())
    assert _files(out) == before  # checkpoint-2 was deleted first, before checkpoint-3 failed
    monkeypatch.setattr(os, "access", real_access)
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    with pytest.raises(UserError, match="could not delete the earlier run's .*checkpoint-2: .*Read-only file system"):
        ckpt.prepare_checkpoint_folder(out, None, None, True, _OneProcess())
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    # a symlinked checkpoint: the link goes, not what it points to (rmtree refused it)
    target = _checkpoint(tmp_path / "elsewhere", 9)
    second.rename(tmp_path / "moved")
    (out / "checkpoint-3").symlink_to(target)
    ckpt.prepare_checkpoint_folder(out, None, None, True, _OneProcess())
    assert _files(out) == [] and target.is_dir() and not first.exists()


def test_a_file_where_the_checkpoint_folder_goes_is_refused_before_the_run(tmp_path):
    from ipl_diffusion.errors import UserError

    (tmp_path / "checkpoints").write_text("a user's file")
    for overwrite in (False, True):  # it failed in save_checkpoint, after training
        with pytest.raises(UserError, match="is a file where the run's checkpoint folder goes"):
            ckpt.check_before_run(tmp_path / "checkpoints", None, overwrite=overwrite)
