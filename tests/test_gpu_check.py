"""The GPU check script (make gpu-check) on the CPU: every step that does not need CUDA runs,
and on a machine with a GPU nothing may be skipped or fail quietly."""

import json

import pytest
import torch

from benchmarks import gpu_check


def run(tmp_path, *args):
    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--out", str(out), *args])
    return code, json.loads(out.read_text())


def test_cpu_steps_run_and_cuda_steps_are_reported_as_needing_cuda(tmp_path, capsys):
    code, result = run(tmp_path, "--only", "extension", "pytest_cuda", "kernel_bandwidth",
                       "strategy_fsdp", "strategy_deepspeed_zero3", "overflow_16_mixed",
                       "cogview4b_sampling", "--sampling-preset", "tiny", "--image-tokens", "16",
                       "--overflow-steps", "3")
    steps = result["steps"]
    assert code == 0 and result["ok"] and result["failed"] == []
    for name in ("extension", "pytest_cuda", "kernel_bandwidth", "strategy_fsdp",
                 "strategy_deepspeed_zero3"):
        assert steps[name]["status"] == "needs_cuda", (name, steps[name])
    overflow = steps["overflow_16_mixed"]
    assert overflow["status"] == "ok"
    # the demonstration: plain attention overflows fp16 on every step, PB-relax never does
    assert overflow["pb_relax_off"]["nonfinite_steps"] == 3
    assert overflow["pb_relax_on"]["nonfinite_steps"] == 0
    assert overflow["pb_relax_off"]["max_attention_score_fp32_equivalent"] > torch.finfo(
        torch.float16).max
    sampling = steps["cogview4b_sampling"]
    assert sampling["status"] == "ok" and [r["batch"] for r in sampling["batches"]] == [1, 8]
    printed = capsys.readouterr().out
    assert "overflow_16_mixed" in printed and "gpu check: all steps passed" in printed


def test_with_a_gpu_present_a_skipped_or_broken_step_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    code, result = run(tmp_path, "--only", "extension")
    assert code == 1 and result["failed"] == ["extension"]  # needs_cuda is not a pass here

    def broken(args):
        raise ValueError("planted")

    monkeypatch.setattr(gpu_check, "sampling_speed", broken)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, result = run(tmp_path, "--only", "cogview4b_sampling")
    assert code == 1 and result["steps"]["cogview4b_sampling"]["status"] == "failed"
    assert "ValueError: planted" in result["steps"]["cogview4b_sampling"]["error"]


@pytest.mark.slow
def test_ddp_strategy_check_trains_exports_and_compares_logits_on_cpu(tmp_path):
    code, result = run(tmp_path, "--only", "strategy_ddp", "--strategy-preset", "tiny",
                       "--train-steps", "4")
    ddp = result["steps"]["strategy_ddp"]
    assert code == 0 and ddp["status"] == "ok", ddp
    assert ddp["steps"] == 4 and ddp["max_abs_logit_difference"] <= 1e-6
    assert ddp["resumed_to_step"] == 6
