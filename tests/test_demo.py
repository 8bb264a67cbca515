"""`make demo` at a minute-scale budget: every stage runs and the report has its pictures."""

import json

import pytest

from cogview.demo import main


@pytest.mark.slow
def test_demo_smoke_budget_writes_report_and_reuses_stages(tmp_path, capsys):
    args = ["budget=smoke", f"artifacts_dir={tmp_path / 'artifacts'}",
            f"report_dir={tmp_path / 'report'}", f"runs_dir={tmp_path / 'runs'}"]
    assert main(args) == 0
    report_dir = tmp_path / "report"
    report = (report_dir / "report.md").read_text()
    pictures = ["t2i_seen.png", "t2i_heldout.png", "t2i_two.png", "t2i_two_reranked.png",
                "caption_seen.png", "sr_seen.png", "t2i_accuracy.png", "quality_curves.png",
                "loss_curves.png", "vqvae_reconstructions.png"]
    for picture in pictures:
        assert picture in report and (report_dir / picture).is_file(), picture
    scores = json.loads((report_dir / "scores.json").read_text())
    from cogview import cpu
    from cogview.precision import auto_precision

    assert scores["machine"]["precision"] == auto_precision("cpu")[0]  # the timings' context
    assert scores["machine"]["cpu_isa"] == (cpu.cpu_isa_level() or "unknown")
    assert f"precision {scores['machine']['precision']}" in report
    assert f"models in `{tmp_path / 'artifacts'}/`" in report  # where this run put them
    assert set(scores["t2i"]) == {"seen", "heldout", "two"}
    for split in scores["t2i"].values():
        assert {"one_sample", "rerank", "caps", "fid", "fid_k", "is"} <= set(split)
        assert split["cfg_scale"] == scores["config"]["eval"]["cfg_scale"] == 1.5
    assert "classifier-free guidance 1.5" in report
    assert set(scores["caption"]) == {"seen", "heldout", "two"}
    assert {"psnr", "unrefined_psnr", "bicubic_psnr", "bicubic_input_psnr",
            "ssim"} <= set(scores["sr"]["seen"])
    assert [p["step"] for p in scores["curves"]["t2i"]] == [10, 20]
    assert [p["step"] for p in scores["curves"]["caption"]] == [5, 10]
    assert [p["step"] for p in scores["curves"]["sr"]] == [6]
    assert "two_exact_match" in scores["curves"]["caption"][0]
    assert {"seen_psnr", "seen_unrefined_psnr", "seen_bicubic_psnr"} <= set(
        scores["curves"]["sr"][0])
    for stage in ("vqvae", "t2i", "caption", "sr"):
        assert (tmp_path / "artifacts" / stage / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(args) == 0  # the second run reuses every finished stage
    assert capsys.readouterr().out.count("reusing") == 6
    report = (report_dir / "report.md").read_text()
    assert "not recorded" not in report  # reused stages show the time they took when they ran


@pytest.mark.parametrize("budget", ["smoke", "full", "long"])
def test_budgets_compose_and_score_at_the_last_step(budget):
    """Every budget names every stage, and each training stage scored while training is scored
    at its last step (the quality curve ends where the benchmark's model is)."""
    from cogview.demo import compose_config

    demo = compose_config("demo", [f"budget={budget}"])
    assert demo.vqvae.steps > 0 and demo.data.samples > 0
    for task in ("t2i", "caption", "sr"):
        stage = demo[task]
        assert stage.eval_every == 0 or stage.steps % stage.eval_every == 0, (budget, task)
        assert stage.warmup_steps < stage.steps


def test_budgets_write_to_their_own_folders():
    """A finished stage is reused by its folder, so two budgets must never share one: a
    smoke run before `make demo` would otherwise hand its 20-step t2i model to the default."""
    from cogview.demo import compose_config

    folders = {}
    for budget in ("smoke", "full", "long"):
        demo = compose_config("demo", [f"budget={budget}"])
        for key in ("artifacts_dir", "report_dir", "runs_dir"):
            assert demo[key] not in folders, (budget, key, folders.get(demo[key]))
            folders[demo[key]] = (budget, key)
    assert compose_config("demo", [])["artifacts_dir"] == "artifacts/demo"  # the README's paths
    override = compose_config("demo", ["budget=long", "artifacts_dir=elsewhere"])
    assert override.artifacts_dir == "elsewhere"


def test_stage_reruns_when_its_settings_change(tmp_path, capsys):
    """A stage is reused only when its output was made with the same settings; otherwise the
    earlier output moves to <folder>.previous and the stage runs again."""
    from cogview.demo import stage

    out = tmp_path / "t2i"
    runs = []

    def run(tag):
        def write():
            runs.append(tag)
            out.mkdir(exist_ok=True)
            (out / "config.json").write_text(tag)
        return write

    done = out / "config.json"
    assert stage("train", done, run("a"), {"steps": 600, "model": {"layers": 6}}, (out,)) >= 0
    assert stage("train", done, run("b"), {"steps": 600, "model": {"layers": 6}}, (out,)) is not None
    assert runs == ["a"] and "reusing" in capsys.readouterr().out
    stage("train", done, run("c"), {"steps": 900, "model": {"layers": 6}}, (out,))
    message = capsys.readouterr().out
    assert runs == ["a", "c"] and "steps: 600 -> 900" in message and "layers" not in message
    assert done.read_text() == "c" and (tmp_path / "t2i.previous" / "config.json").read_text() == "a"
    stage("train", done, run("d"), {"steps": 900, "model": {"layers": 8}}, (out,))
    assert "model.layers: 6 -> 8" in capsys.readouterr().out
    assert (tmp_path / "t2i.previous" / "config.json").read_text() == "c"  # one level kept
    record = out / "demo_stage_seconds.json"
    record.write_text(json.dumps({"stage": "train", "seconds": 12.0}))  # an older demo's record
    assert stage("train", done, run("e"), {"steps": 1}, (out,)) == 12.0
    assert runs == ["a", "c", "d"] and "before the demo recorded its settings" in capsys.readouterr().out


def test_stage_settings_follow_the_stages_inputs():
    """A changed t2i value reaches caption and sr (fine-tuned from t2i), not the VQ-VAE or the
    shards; a changed caption value reaches only caption; a changed VQ-VAE value reaches all."""
    from cogview.demo import compose_config, stage_settings

    base = stage_settings(compose_config("demo", []))

    def changed(override):
        new = stage_settings(compose_config("demo", [override]))
        return {name for name in base if base[name] != new[name]}

    assert changed("t2i.lr=0.001") == {"t2i", "caption", "sr"}
    assert changed("caption.steps=900") == {"caption"}
    assert changed("sr.steps=60") == {"sr"}
    assert changed("data.sr_samples=600") == {"shards-sr", "sr"}
    assert changed("vqvae.steps=100") == set(base)
    assert changed("report_dir=elsewhere") == set()
    json.dumps(base)  # recorded as JSON
