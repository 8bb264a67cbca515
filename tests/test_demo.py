"""`make demo` at a minute-scale budget: every stage runs and the report has its pictures."""

import json

import pytest

from cogview.demo import main


@pytest.mark.slow
def test_demo_smoke_budget_writes_report_and_reuses_stages(tmp_path, capsys):
    args = ["budget=smoke", f"artifacts_dir={tmp_path / 'artifacts'}",
            f"report_dir={tmp_path / 'report'}", f"runs_dir={tmp_path / 'runs'}"]
    assert main(args) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    for picture in ("t2i_seen.png", "t2i_heldout.png", "t2i_two.png", "vqvae_reconstructions.png"):
        assert picture in report and (tmp_path / "report" / picture).is_file()
    scores = json.loads((tmp_path / "report" / "scores.json").read_text())
    assert set(scores["t2i"]) == {"seen", "heldout", "two"}
    for stage in ("vqvae", "t2i"):
        assert (tmp_path / "artifacts" / stage / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(args) == 0  # the second run reuses every finished stage
    assert capsys.readouterr().out.count("reusing") == 3
