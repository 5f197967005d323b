"""benchmarks/main_job.py: an interrupted measurement resumes only into the same measurement."""

import json

from repo_scripts import load_script


def test_results_judged_by_another_oracle_are_not_resumed(tmp_path):
    main_job = load_script("benchmarks/main_job.py")
    rows = [{"backend": "diffae", "target": "sketch", "seed": 0, "target_acc": 0.5}]
    old = tmp_path / "results.json"
    old.write_text(json.dumps({"extra": [], "image_target": None, "results": rows}))  # from before --oracle
    assert main_job.previous_results(old, [], None) == rows  # the shipped oracle judged them
    assert main_job.previous_results(old, [], None, "benchmarks/results/oracle_object") == []
    old.write_text(json.dumps({"extra": [], "image_target": None, "oracle": "benchmarks/results/oracle_object", "results": rows}))
    assert main_job.previous_results(old, [], None, "benchmarks/results/oracle_object") == rows
    assert main_job.previous_results(old, [], None) == []
    assert main_job.parse_args(["--oracle", "o"]).oracle == "o" and main_job.parse_args([]).oracle is None
