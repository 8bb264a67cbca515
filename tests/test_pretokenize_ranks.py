"""Pretokenizing with several ranks: disjoint input tars, exactly once, resumable, mergeable."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cogview.data import sources
from cogview.data.shards import resolve_shards
from cogview.data.pretokenize import distributed_position
from tests.helpers import ROOT, make_vqvae
from tests.test_pretokenize import read_samples, run, shapes_png, tar_bytes

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def vqvae_dir(tmp_path_factory):
    return make_vqvae(tmp_path_factory.mktemp("vqvae"))


def make_tars(directory, num_tars: int, per_tar: int) -> str:
    """`num_tars` img2dataset-style input tars of `per_tar` 16-px samples; their brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    for t in range(num_tars):
        members = [(f"t{t}-{i:03d}.{ext}", data) for i in range(per_tar)
                   for ext, data in zip(("png", "txt"), shapes_png(per_tar * t + i, 16))]
        (directory / f"{t}.tar").write_bytes(tar_bytes(members))
    return f"{directory}/{{0..{num_tars - 1}}}.tar"


def command(vqvae_dir, out, pattern, *extra):
    return ["-m", "cogview.data.pretokenize", f"vqvae_dir={vqvae_dir}", f"out={out}",
            "source.kind=shards", f"source.shards.urls='{pattern}'", "size=16", "shard_size=3",
            "batch_size=4", "num_workers=0", "progress=false", *extra]


def torchrun(args, port: int):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def contents(out) -> dict[str, tuple]:
    """Source key -> (output key, caption, text ids, image codes) of every sample in `out`."""
    found = {}
    for sample in read_samples(out):
        key = json.loads(sample["json"])["key"]
        assert key not in found, f"sample {key} written twice"
        found[key] = (sample["__key__"], sample["txt"], sample["text_ids.npy"],
                      sample["image_codes.npy"])
    return found


def test_rank_and_world_come_from_torchrun_or_slurm(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                 "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_position({}) == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert distributed_position({}) == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed_position({}) == (2, 4, 0)  # torchrun's variables win
    assert distributed_position({"rank": 1, "world_size": 3}) == (1, 3, 0)
    with pytest.raises(ValueError, match=r"rank=3 with world_size=3"):
        distributed_position({"rank": 3, "world_size": 3})
    with pytest.raises(ValueError, match="set both"):
        distributed_position({"rank": 1, "world_size": None})


def test_two_ranks_over_six_tars_write_every_sample_once_as_one_process_does(vqvae_dir,
                                                                           tmp_path):
    pattern = make_tars(tmp_path / "in", num_tars=6, per_tar=5)
    result = torchrun(command(vqvae_dir, tmp_path / "two", pattern), port=29541)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "two" / "logs").iterdir())
    assert logs == ["rank0", "rank1"]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 30
    assert manifest["layout"] == "per_input_tar"
    # every input tar has its own shards (5 samples, shard_size 3: two each), named from it
    names = sorted(s["name"] for s in manifest["shards"])
    assert names == [f"tokens-{t:06d}-{j:06d}.tar" for t in range(6) for j in range(2)]

    one = run(vqvae_dir, tmp_path / "one", "source.kind=shards",
              f"source.shards.urls='{pattern}'", "size=16", "shard_size=3", "batch_size=4")
    assert sorted(s["name"] for s in one["shards"]) == names
    two_samples, one_samples = contents(tmp_path / "two"), contents(tmp_path / "one")
    assert sorted(two_samples) == sorted(f"t{t}-{i:03d}" for t in range(6) for i in range(5))
    assert two_samples == one_samples  # the same samples, keys, ids and codes


def test_a_killed_rank_is_redone_by_rerunning_the_same_command(vqvae_dir, tmp_path):
    """Rank 1 of 2 is SIGKILLed mid-run; rank 0 finishes its tars and leaves the manifest
    incomplete; the same command again finishes rank 1's tars only: every sample once."""
    pattern = make_tars(tmp_path / "in", num_tars=6, per_tar=50)
    out = tmp_path / "out"
    args = command(vqvae_dir, out, pattern, "shard_size=5")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**env, "RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              start_new_session=True) for r in (0, 1)]
    try:
        deadline = time.time() + 60
        while not list(out.glob("tokens-000001-*.tar")) and time.time() < deadline:
            assert ranks[1].poll() is None, ranks[1].stderr.read().decode()[-2000:]
            time.sleep(0.005)
        os.kill(ranks[1].pid, signal.SIGKILL)
        ranks[1].wait(timeout=30)
        assert ranks[0].wait(timeout=120) == 0, ranks[0].stderr.read().decode()[-2000:]
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
            process.stderr.close()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"], "a manifest was written while rank 1's tars were missing"
    rank1 = sorted(p.name for p in out.glob("*.tar") if int(p.name.split("-")[1]) % 2)
    assert 1 <= len(rank1) < 30, "rank 1 was not interrupted mid-way"
    for shard in out.glob("*.tar"):  # every final-named shard is complete
        assert [type(r) for r in sources.read_tar(str(shard))] == [sources.TarRecord] * 5
    kept = {p.name: p.stat().st_ino for p in out.glob("*.tar")}

    result = torchrun(args, port=29542)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(out.glob("*.tmp"))
    assert {p.name: p.stat().st_ino for p in out.glob("*.tar") if p.name in kept} == kept
    samples = contents(out)
    assert sorted(samples) == sorted(f"t{t}-{i:03d}" for t in range(6) for i in range(50))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_samples"] == 300
    assert len(manifest["shards"]) == 60


def test_a_rank_with_another_tokenizer_is_refused_and_merge_names_foreign_shards(vqvae_dir,
                                                                                  tmp_path):
    pattern = make_tars(tmp_path / "in", num_tars=2, per_tar=3)
    other_vqvae = make_vqvae(tmp_path / "other-vqvae", num_codes=32)
    out = tmp_path / "out"
    common = ("source.kind=shards", f"source.shards.urls='{pattern}'", "size=16",
              "shard_size=3", "world_size=2")
    partial = run(vqvae_dir, out, *common, "rank=0")
    assert not partial["complete"]
    with pytest.raises(ValueError, match="the tokenizers differ"):  # rank 1 on another VQ-VAE
        run(other_vqvae, out, *common, "rank=1")
    with pytest.raises(RuntimeError, match=r"1 of 2 input tars are not done yet.*1\.tar"):
        run(vqvae_dir, out, *common, "rank=0", "merge=true")
    # outputs of another tokenizer copied in beside them: the merge refuses them, by name
    (out / "manifest.json").rename(tmp_path / "manifest.json")
    with pytest.raises(ValueError, match=r"e\.g\. tokens-000000-000000\.tar \(fingerprints"):
        run(other_vqvae, out, *common, "rank=1")  # it writes its shards, then sees rank 0's
    assert (out / "tokens-000001-000000.tar").is_file()
    (tmp_path / "manifest.json").replace(out / "manifest.json")
    with pytest.raises(ValueError, match=r"another configuration or tokenizer, e\.g\. "
                                         r"tokens-000001-000000\.tar \(fingerprints"):
        run(vqvae_dir, out, *common, "rank=0", "merge=true")


def test_shards_go_to_a_pipe_command_and_the_manifest_finds_them(vqvae_dir, tmp_path):
    pattern = make_tars(tmp_path / "in", num_tars=2, per_tar=4)
    remote, out = tmp_path / "remote", tmp_path / "out"
    remote.mkdir()
    common = ("source.kind=shards", f"source.shards.urls='{pattern}'", "size=16",
              "shard_size=3")
    with pytest.raises(OSError, match="exit 1"):  # a failing upload is an error ...
        run(vqvae_dir, out, *common, "shard_url='pipe:cat > /dev/null; exit 1'")
    assert not list(out.glob("*.stats.json")), "a failed upload was counted as done"
    manifest = run(vqvae_dir, out, *common, f"shard_url='pipe:cat > {remote}/{{name}}'")
    names = [f"tokens-{t:06d}-{j:06d}.tar" for t in range(2) for j in range(2)]
    assert sorted(p.name for p in remote.iterdir()) == names  # ... a rerun sends them all
    assert not list(out.glob("*.tar")) and not list(out.glob("*.tmp"))
    assert [s["url"] for s in manifest["shards"]] == [f"pipe:cat > {remote}/{n}" for n in names]
    assert sum(len(list(sources.read_tar(str(remote / n)))) for n in names) == 8
    assert run(vqvae_dir, out, *common,
               f"shard_url='pipe:cat > {remote}/{{name}}'")["num_samples"] == 8  # done already
    # training reads them through any URL, counting samples from the manifest kept in out
    shard_set = resolve_shards([f"pipe:cat {remote}/{n}" for n in names],
                               manifest=str(out / "manifest.json"))
    assert shard_set.counts == [3, 1, 3, 1]
    template = resolve_shards(f"pipe:cat {remote}/{{name}}", manifest=str(out / "manifest.json"))
    assert template.urls == [f"pipe:cat {remote}/{n}" for n in names]
    assert template.counts == [3, 1, 3, 1]
    with pytest.raises(ValueError, match=r"data\.manifest=PATH"):
        resolve_shards(f"pipe:cat {remote}/{{name}}")
