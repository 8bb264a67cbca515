"""Pipeline conventions users of diffusers/transformers expect: Hub ids (offline, from a cache
the test fills), save_pretrained, push_to_hub's refusal offline, torch_dtype, .to(), generator=,
and the model card every export carries."""

import shutil

import numpy as np
import pytest
import torch
import yaml

from cogview.model_card import write_model_card
from tests.test_pipeline import exports, pipe  # noqa: F401  (the same tiny exports)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def pixels(images) -> list[bytes]:
    return [np.asarray(image).tobytes() for image in images]


def card_metadata(directory) -> dict:
    text = (directory / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """huggingface_hub in offline mode with an empty cache under tmp_path."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub-cache"


def put_in_cache(cache, repo_id: str, export, revision: str = "main", commit: str = COMMIT):
    """The layout huggingface_hub's snapshot_download leaves: refs/<revision> -> snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(export, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)


def test_hub_ids_load_from_the_cache_offline_with_revision(pipe, exports, offline_hub):
    from cogview import Pipeline

    put_in_cache(offline_hub, "shapes/cogview-t2i", exports / "t2i")
    put_in_cache(offline_hub, "shapes/cogview-t2i", exports / "caption", revision="captioner",
                 commit="f" * 40)
    loaded = Pipeline.from_pretrained("shapes/cogview-t2i", cache_dir=offline_hub,
                                      precision="32-true")
    assert loaded.task == "t2i"
    for name, value in pipe.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    other = Pipeline.from_pretrained("shapes/cogview-t2i", revision="captioner",
                                     cache_dir=offline_hub, local_files_only=True)
    assert other.task == "caption"
    with pytest.raises(FileNotFoundError, match="not in the Hub cache"):
        Pipeline.from_pretrained("shapes/missing", cache_dir=offline_hub)
    with pytest.raises(FileNotFoundError, match="no such export directory"):
        Pipeline.from_pretrained("./not/here")


def test_save_pretrained_round_trips_and_push_to_hub_refuses_offline(pipe, tmp_path,
                                                                      offline_hub):
    from cogview import Pipeline

    saved = pipe.save_pretrained(tmp_path / "saved")
    loaded = Pipeline.from_pretrained(saved, precision="32-true")
    assert loaded.info == {**pipe.info, "text_tokenizer": "text_tokenizer",
                           "image_tokenizer": "vqvae"}
    for name, value in pipe.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    assert loaded.text_tokenizer.fingerprint() == pipe.text_tokenizer.fingerprint()
    assert pixels(loaded("红色", num_images=2, seed=3, image_tokens=16, progress=False).images) \
        == pixels(pipe("红色", num_images=2, seed=3, image_tokens=16, progress=False).images)
    assert card_metadata(saved)["library_name"] == "cogview"
    with pytest.raises(RuntimeError, match="offline mode.*HF_HUB_OFFLINE"):
        pipe.push_to_hub("shapes/cogview-t2i")


def test_torch_dtype_and_to_return_the_pipeline(exports):
    from cogview import Pipeline

    half = Pipeline.from_pretrained(exports / "t2i", torch_dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert Pipeline.from_pretrained(exports / "t2i", dtype="bf16",
                                    torch_dtype=torch.bfloat16).model is not None
    with pytest.raises(ValueError, match="disagree"):
        Pipeline.from_pretrained(exports / "t2i", dtype="fp16", torch_dtype=torch.bfloat16)
    assert half.to("cpu") is half and half.device == torch.device("cpu")
    assert half.to(dtype=torch.float32) is half
    assert next(half.model.parameters()).dtype == torch.float32


def test_generator_draws_the_seeds(pipe):
    small = dict(num_images=2, image_tokens=16, progress=False)
    base = int(torch.randint(0, 2**31 - 1, (), generator=torch.Generator().manual_seed(7)))
    from_generator = pipe("红色", generator=torch.Generator().manual_seed(7), **small)
    assert from_generator.seeds == [base, base + 1]
    assert pixels(from_generator.images) == pixels(pipe("红色", seed=base, **small).images)
    seeds = [int(torch.randint(0, 2**31 - 1, (), generator=torch.Generator().manual_seed(s)))
             for s in (1, 2)]
    per_image = pipe("红色", generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                     **small)
    assert per_image.seeds == seeds
    assert pixels(per_image.images) == [pixels(pipe("红色", seed=s, num_images=1, image_tokens=16,
                                                    progress=False).images)[0] for s in seeds]
    with pytest.raises(ValueError, match="seed= or generator="):
        pipe("红色", seed=1, generator=torch.Generator(), **small)
    with pytest.raises(ValueError, match="a list of 1 for 2 samples"):
        pipe("红色", generator=[torch.Generator()], **small)


def test_every_export_has_a_model_card_with_hub_metadata(exports, tmp_path):
    meta = card_metadata(exports / "t2i")
    assert meta == {"library_name": "cogview", "language": ["zh"],
                    "pipeline_tag": "text-to-image",
                    "tags": ["cogview", "t2i", "vq-vae", "autoregressive", "chinese"]}
    assert card_metadata(exports / "caption")["pipeline_tag"] == "image-to-text"
    card = (exports / "t2i" / "README.md").read_text(encoding="utf-8")
    assert "| num_layers | 2 |" in card and "Not evaluated yet" in card
    copy = shutil.copytree(exports / "t2i", tmp_path / "t2i")
    write_model_card(copy, scores={"seen": {"one_sample": {"full_match": 0.5}, "n_prompts": 4}})
    card = (copy / "README.md").read_text(encoding="utf-8")
    assert "| seen | one_sample.full_match | 0.5 |" in card
    write_model_card(copy)  # a later rewrite keeps the scores
    assert "| seen | one_sample.full_match | 0.5 |" in (copy / "README.md").read_text()
