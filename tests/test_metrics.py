"""Evaluation metrics: FID / FID-k, IS, caption-score summaries, SR PSNR/SSIM, rerank gain,
feature extractors and report plots. (The oracle at >= 99 % on clean renders is
tests/test_oracle.py::test_clean_renders_read_back_exactly.)"""

import copy
import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from PIL import Image

from cogview.data.shapes import COLORS, SHAPES, pil_to_tensor, render_scene, sample_scene
from cogview.eval.features import (
    InceptionV3,
    OracleClassifier,
    RandomConvFeatures,
    VQVAEFeatures,
    make_classifier,
    make_feature_extractor,
    resize_bilinear_tf1,
)
from cogview.eval.metrics import (
    blurred_fid,
    caption_score_summary,
    fid,
    frechet_distance,
    gaussian_blur,
    image_batch,
    inception_score,
    inception_score_from_logits,
    rerank_gain,
    sr_metrics,
)
from cogview.eval.plots import plot_accuracy_bars, plot_loss_curves, read_metrics_csv, run_name
from tests.helpers import make_vqvae

N_SET = 96  # images per set


def render_set(scenes, size=64):
    return torch.stack([pil_to_tensor(render_scene(s, size)) for s in scenes])


@pytest.fixture(scope="module")
def scenes():
    return {seed: [sample_scene(seed, "train", i)[0] for i in range(N_SET)] for seed in (1, 2)}


@pytest.fixture(scope="module")
def real(scenes):
    return render_set(scenes[1])


@pytest.fixture(scope="module")
def other_real(scenes):
    return render_set(scenes[2])


def gaussian_samples(mean, cov, n, seed):
    """Samples whose sample mean and (n-1)-normalised covariance are exactly mean and cov."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # cov(z) = I
    return z @ np.linalg.cholesky(cov).T + mean


def scipy_frechet(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


# ---------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_scipy_reference():
    rng = np.random.default_rng(0)
    d = 12
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    a = rng.normal(size=(400, d)) @ m1 + 1.0
    b = rng.normal(size=(300, d)) @ m2 - 0.5
    expected = scipy_frechet(a, b)
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == (
        pytest.approx(expected, rel=1e-4))


def test_frechet_distance_closed_form_for_known_gaussians():
    d = 6
    mean_a, mean_b = np.zeros(d), np.arange(d, dtype=float)
    var_a, var_b = np.linspace(0.5, 2.0, d), np.linspace(3.0, 1.0, d)
    a = gaussian_samples(mean_a, np.diag(var_a), 200, seed=1)
    b = gaussian_samples(mean_b, np.diag(var_b), 150, seed=2)
    # diagonal covariances: |mu_a - mu_b|^2 + sum (sqrt(var_a) - sqrt(var_b))^2
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # isotropic: N(0, I) vs N(m, 4I) -> |m|^2 + d (1 + 4 - 2 * 2)
    c = gaussian_samples(np.full(d, 2.0), 4 * np.eye(d), 150, seed=3)
    assert frechet_distance(gaussian_samples(np.zeros(d), np.eye(d), 150, seed=4), c) == (
        pytest.approx(4.0 * d + d, rel=1e-9))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("real, fake, words", [
    (np.zeros((1, 4)), np.zeros((10, 4)), ["at least 2 real", "got 1"]),
    (np.random.rand(10, 4), np.zeros((0, 4)), ["at least 2 fake", "got 0"]),
    (np.random.rand(10, 4), np.random.rand(10, 5), ["dimension 4", "5", "same extractor"]),
    (np.random.rand(10), np.random.rand(10, 4), ["[N, D]"]),
    (np.full((10, 4), np.nan), np.random.rand(10, 4), ["NaN"]),
])
def test_frechet_distance_bad_input(real, fake, words):
    with pytest.raises(ValueError) as err:
        frechet_distance(real, fake)
    for word in words:
        assert word in str(err.value)


def test_frechet_distance_warns_when_covariance_is_singular():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="singular"):
        frechet_distance(rng.normal(size=(5, 8)), rng.normal(size=(50, 8)))


# ---------------------------------------------------------------------------- FID on images


def test_blurred_fid_is_zero_for_identical_sets(real):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 96 images, 16 features: no singular-covariance warning
        result = blurred_fid(real, real.clone())
    assert list(result) == [0, 1, 2, 4, 8]
    assert all(value == pytest.approx(0.0, abs=1e-9) for value in result.values())


def test_fid_grows_with_a_shifted_set(scenes, real, other_real):
    floor = fid(real, other_real)  # two samples of the same distribution
    small = copy.deepcopy(scenes[2])
    for scene in small:
        for obj in scene["objects"]:
            obj["size"] = "小"
    shifted = render_set(small)
    assert fid(real, shifted) > 3 * floor
    # FID-k: the shift stays visible under every blur; identical sets stay at 0
    by_radius = blurred_fid(real, shifted, radii=(0, 2, 8))
    floor_by_radius = blurred_fid(real, other_real, radii=(0, 2, 8))
    for k in (0, 2, 8):
        assert by_radius[k] > 1.5 * floor_by_radius[k], (k, by_radius, floor_by_radius)


def test_fid_grows_with_blur_of_the_fake_set(real, other_real):
    values = [fid(real, gaussian_blur(other_real, r)) for r in (0, 1, 2, 4)]
    assert values == sorted(values) and values[-1] > 5 * values[0], values


def test_fid_input_forms_agree(real, other_real):
    pils = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in other_real]
    uint8 = (real * 255).round().byte()
    expected = fid(real, other_real)
    assert fid(uint8, pils) == pytest.approx(expected, rel=1e-5)
    arrays = uint8.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    assert fid(arrays, list(other_real)) == pytest.approx(expected, rel=1e-5)


def test_fid_with_any_module_and_blur_radius(real, other_real):
    class MeanColour(nn.Module):
        def forward(self, images):
            return images.mean(dim=(2, 3))  # (N, 3)

    expected = frechet_distance(real.mean(dim=(2, 3)), other_real.mean(dim=(2, 3)))
    assert fid(real, other_real, MeanColour()) == pytest.approx(expected, rel=1e-6)
    blurred = fid(real, other_real, MeanColour(), blur_radius=2)
    assert blurred == pytest.approx(frechet_distance(
        gaussian_blur(real, 2).mean(dim=(2, 3)).double(),
        gaussian_blur(other_real, 2).mean(dim=(2, 3)).double()), rel=1e-6)


@pytest.mark.parametrize("make_real, make_fake, words", [
    (lambda r: [], lambda r: r, ["real is empty"]),
    (lambda r: r, lambda r: r[:0], ["fake is empty"]),
    (lambda r: r, lambda r: r[:1], ["at least 2 fake"]),
    (lambda r: r, lambda r: r[:, :, :32, :32], ["(3, 64, 64)", "(3, 32, 32)", "resize"]),
    (lambda r: r[:, :1], lambda r: r[:, :1], ["1 channels", "RGB"]),
    (lambda r: r * 255, lambda r: r, ["[0, 1]", "255"]),
    (lambda r: [render_scene(sample_scene(0, "train", 0)[0], 64),
                render_scene(sample_scene(0, "train", 1)[0], 32)],
     lambda r: r, ["mixes image shapes"]),
    (lambda r: [Image.new("L", (64, 64))] * 2, lambda r: r, ["mode 'L'", "convert('RGB')"]),
    (lambda r: r[0], lambda r: r, ["[N, 3, H, W]", "images[None]"]),
    (lambda r: "a folder", lambda r: r, ["str"]),
])
def test_fid_bad_input(real, make_real, make_fake, words):
    with pytest.raises(ValueError) as err:
        fid(make_real(real), make_fake(real))
    for word in words:
        assert word in str(err.value)


def test_image_batch_normalises_forms():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    batch = image_batch(pixels)
    assert batch.dtype == torch.float32 and batch[0, :, 0, 0].tolist() == pytest.approx([0, 0.2, 1])
    assert torch.equal(image_batch([Image.new("RGB", (4, 4), (0, 51, 255))] * 2), batch)
    with pytest.raises(ValueError, match="mixes dtypes"):
        image_batch([pixels[0], pixels[0].float() / 255])


def test_extractor_with_wrong_output_shape_is_named(real):
    class Grid(nn.Module):
        def forward(self, images):
            return images[:, :, :4, :4]

    with pytest.raises(ValueError, match=r"Grid returned \(.*\) .* must return \[N, D\]"):
        fid(real[:4], real[4:8], Grid())


def test_blur_radius_validation(real):
    with pytest.raises(ValueError, match="radius=-1"):
        fid(real[:4], real[4:8], blur_radius=-1)
    with pytest.raises(ValueError, match="radii is empty"):
        blurred_fid(real[:4], real[4:8], radii=())


# ---------------------------------------------------------------------------- extractors


def test_random_features_are_fixed_by_the_seed(real):
    a, b, c = RandomConvFeatures(0), RandomConvFeatures(0), RandomConvFeatures(1)
    with torch.no_grad():
        fa, fb, fc = a(real[:8]), b(real[:8]), c(real[:8])
    assert fa.shape == (8, a.num_features) == (8, 16)
    assert torch.equal(fa, fb) and not torch.allclose(fa, fc)
    spec = make_feature_extractor("random:1")
    with torch.no_grad():
        assert torch.equal(spec(real[:8]), fc)


def test_vqvae_features(tmp_path, real):
    make_vqvae(tmp_path / "vq", num_codes=32)
    extractor = make_feature_extractor(f"vqvae:{tmp_path / 'vq'}")
    assert isinstance(extractor, VQVAEFeatures)
    with torch.no_grad():
        features = extractor(real[:5])
    assert features.shape == (5, extractor.num_features) == (5, 16)  # code_dim 16, grid 1
    assert fid(real[:20], real[20:40], extractor) > 0
    with pytest.raises(ValueError, match="not a VQ-VAE export"):
        make_feature_extractor(f"vqvae:{tmp_path}")


def test_resize_matches_tensorflow1_bilinear():
    image = torch.tensor([[10.0, 20.0], [30.0, 40.0]])[None, None]  # (1, 1, 2, 2)
    # output pixel i samples input coordinate i * 2 / 4 = 0, 0.5, 1, 1.5 (clamped at the edge)
    row = torch.tensor([10.0, 15.0, 20.0, 20.0])
    expected = torch.stack([row, row + 10, row + 20, row + 20])
    assert torch.allclose(resize_bilinear_tf1(image, 4)[0, 0], expected)


def test_inception_loads_weights_file_and_gives_pool_and_logits(tmp_path, real):
    torch.manual_seed(0)
    reference = InceptionV3()
    for module in reference.modules():  # keep random activations near unit scale (no denormals)
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.fill_(0.15)
    path = tmp_path / "pt_inception.pth"
    torch.save(reference.state_dict(), path)
    pool = make_feature_extractor(f"inception:{path}")
    logits = make_classifier(f"inception:{path}")
    assert pool.num_features == 2048 and logits.num_features == 1008
    pool.train()  # stays in eval mode: batch norm keeps its stored statistics
    assert not pool.training
    with torch.no_grad():
        features, scores = pool(real[:2]), logits(real[:2])
        expected = reference(real[:2])
    assert features.shape == (2, 2048) and scores.shape == (2, 1008)
    assert 0.1 < expected.abs().mean() < 10 and not torch.allclose(expected[0], expected[1])
    assert torch.equal(features, expected)
    assert torch.allclose(scores, expected @ reference.fc.weight.T, atol=1e-5)


def test_inception_and_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*pt_inception-2015-12-05"):
        make_feature_extractor(f"inception:{tmp_path / 'missing.pth'}")
    torch.save(RandomConvFeatures().state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict"):
        make_feature_extractor(f"inception:{tmp_path / 'other.pth'}")
    with pytest.raises(ValueError, match="unknown.*random"):
        make_feature_extractor("clip:ViT-B")
    with pytest.raises(ValueError, match="seed must be an int"):
        make_feature_extractor("random:abc")
    with pytest.raises(ValueError, match="needs a path"):
        make_feature_extractor("vqvae:")
    with pytest.raises(ValueError, match="classifier spec"):
        make_classifier("random")
    module = nn.Identity()
    assert make_feature_extractor(module) is module and make_classifier(module) is module


# ---------------------------------------------------------------------------- Inception Score


def test_inception_score_known_answers():
    k, per_class = 4, 10
    one_hot = torch.eye(k).repeat(per_class, 1) * 50.0  # (40, 4) logits, uniform over classes
    result = inception_score_from_logits(one_hot, splits=1)
    assert result["mean"] == pytest.approx(k, rel=1e-6) and result["std"] == 0.0
    same = torch.zeros(40, k)
    same[:, 2] = 50.0
    assert inception_score_from_logits(same, splits=1)["mean"] == pytest.approx(1.0, abs=1e-6)
    uniform = torch.zeros(40, k)  # every image unsure: p(y|x) = p(y)
    assert inception_score_from_logits(uniform, splits=1)["mean"] == pytest.approx(1.0, abs=1e-6)


def test_inception_score_matches_numpy_and_is_seeded():
    logits = torch.randn(60, 7, generator=torch.Generator().manual_seed(0)) * 3
    p = torch.softmax(logits.double(), 1).numpy()
    kl = (p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean()
    one_split = inception_score_from_logits(logits, splits=1)
    assert one_split["mean"] == pytest.approx(math.exp(kl), rel=1e-6)
    a = inception_score_from_logits(logits, splits=5, seed=3)
    assert a == inception_score_from_logits(logits, splits=5, seed=3)
    assert a["std"] > 0 and a["splits"] == 5 and a["n"] == 60


def test_inception_score_with_the_oracle_classifier():
    cell_centres = {"左上角": [1 / 6, 1 / 6], "中间": [0.5, 0.5], "右下角": [5 / 6, 5 / 6]}

    def single(color, shape, position):
        return {"objects": [{"color": color, "shape": shape, "position": position, "size": "大"}],
                "centers": [cell_centres[position]]}

    every_pair = [render_scene(single(c, s, "中间")) for c in COLORS for s in SHAPES]  # 28
    result = inception_score(every_pair, "oracle", splits=1)
    assert result["mean"] == pytest.approx(len(every_pair), rel=1e-6)
    same_pair = [render_scene(single("红色", "圆形", p)) for p in cell_centres] * 3
    result = inception_score(same_pair, OracleClassifier(), splits=1)
    assert result["mean"] == pytest.approx(1.0, abs=1e-6)
    blank = torch.full((1, 3, 64, 64), 240 / 255)
    assert OracleClassifier()(blank).argmax(1).item() == 28  # "no object"


@pytest.mark.parametrize("splits, n, words", [(0, 10, "splits=0"), (11, 10, "splits=11")])
def test_inception_score_bad_splits(splits, n, words):
    with pytest.raises(ValueError, match=words):
        inception_score_from_logits(torch.randn(n, 3), splits=splits)


def test_inception_score_bad_images():
    with pytest.raises(ValueError, match="images is empty"):
        inception_score([], nn.Identity())
    with pytest.raises(ValueError, match="3 \\(RGB\\)"):
        inception_score(torch.rand(4, 4, 16, 16), nn.Identity())


# ---------------------------------------------------------------------------- caption score


def test_caption_score_summary():
    summary = caption_score_summary([-1.0, -2.0, -3.0, -6.0])
    assert summary["mean"] == pytest.approx(-3.0)
    assert summary["std"] == pytest.approx(math.sqrt((4 + 1 + 0 + 9) / 4))
    assert (summary["min"], summary["max"], summary["n"]) == (-6.0, -1.0, 4)
    assert summary["per_image"] == [-1.0, -2.0, -3.0, -6.0]
    assert caption_score_summary(torch.tensor([-0.5]))["std"] == 0.0


@pytest.mark.parametrize("scores, words", [
    ([], "no scores"), ([-1.0, float("nan")], "indices [1]"), ([float("-inf")], "not finite")])
def test_caption_score_summary_bad_input(scores, words):
    with pytest.raises(ValueError) as err:
        caption_score_summary(scores)
    assert words in str(err.value)


# ---------------------------------------------------------------------------- SR


@pytest.fixture(scope="module")
def sr_set():
    scenes = [sample_scene(5, "train", i)[0] for i in range(3)]
    return [render_scene(s, 128) for s in scenes], [render_scene(s, 64) for s in scenes]


def test_sr_metrics_identical_and_bicubic_baseline(sr_set):
    targets, lowres = sr_set
    result = sr_metrics(targets, targets, lowres)
    assert result["psnr"] == math.inf and result["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert result["n"] == 3 and len(result["per_image"]) == 3
    # the bicubic baseline: PIL bicubic upsampling of the 64 px input, PSNR by hand
    for image, target, row in zip(lowres, targets, result["per_image"]):
        up = np.asarray(image.resize((128, 128), Image.Resampling.BICUBIC), dtype=np.float64) / 255
        mse = ((up - np.asarray(target, dtype=np.float64) / 255) ** 2).mean()
        assert row["bicubic_psnr"] == pytest.approx(-10 * math.log10(mse), rel=1e-6)
        assert 15 < row["bicubic_psnr"] < 45 and 0.5 < row["bicubic_ssim"] < 1.0
    per_image = [r["bicubic_psnr"] for r in result["per_image"]]
    assert result["bicubic_psnr"] == pytest.approx(np.mean(per_image))
    # an SR output equal to the bicubic upsampling gains nothing; tensors give the same numbers
    bicubic = [im.resize((128, 128), Image.Resampling.BICUBIC) for im in lowres]
    same = sr_metrics(bicubic, torch.stack([pil_to_tensor(t) for t in targets]), lowres)
    assert same["psnr"] == pytest.approx(same["bicubic_psnr"])
    assert same["psnr_gain"] == pytest.approx(0.0)
    assert same["ssim_gain"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("case, words", [
    ("count", ["2 sr_images, 3 targets"]),
    ("size", ["(3, 64, 64)", "resize"]),
    ("lowres", ["larger than the targets"]),
    ("tiny", ["at least 11x11"]),
    ("empty", ["sr_images is empty"]),
])
def test_sr_metrics_bad_input(sr_set, case, words):
    targets, lowres = sr_set
    args = {
        "count": (targets[:2], targets, lowres),
        "size": (lowres, targets, lowres),
        "lowres": (targets, targets, [t.resize((256, 256)) for t in targets]),
        "tiny": ([t.resize((8, 8)) for t in targets], [t.resize((8, 8)) for t in targets],
                 [t.resize((4, 4)) for t in targets]),
        "empty": ([], targets, lowres),
    }[case]
    with pytest.raises(ValueError) as err:
        sr_metrics(*args)
    for word in words:
        assert word in str(err.value)


# ---------------------------------------------------------------------------- rerank


def test_rerank_gain_hand_built():
    groups = [
        [(0.9, True), (0.1, False), (0.2, False), (0.3, False)],  # top right: 1 vs 1/4
        [(0.5, False), (0.4, True)],                              # top wrong: 0 vs 1/2
        [(1.0, True), (1.0, False), (-3.0, False), (-4.0, True)],  # tie at the top: 1/2 vs 1/2
    ]
    result = rerank_gain(groups)
    assert result["top_full_match"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert result["random_full_match"] == pytest.approx((0.25 + 0.5 + 0.5) / 3)
    assert result["gain"] == pytest.approx(0.5 - 1.25 / 3)
    assert (result["n_groups"], result["n_candidates"]) == (3, 10)
    assert result["per_group"][1] == {"top": 0.0, "random": 0.5}
    # a perfect ranker over 8 candidates with one good image gains 7/8
    perfect = rerank_gain([[(float(i == 3), i == 3) for i in range(8)]])
    assert perfect["gain"] == pytest.approx(7 / 8)


@pytest.mark.parametrize("groups, words", [
    ([], "no groups"),
    ([[(1.0, True)], []], "group 1 is empty"),
    ([[(float("nan"), True)]], "non-finite"),
    ([[(1.0, "yes")]], "bools"),
    ([[1.0, 2.0]], "(score, full_match) pairs"),
])
def test_rerank_gain_bad_input(groups, words):
    with pytest.raises(ValueError) as err:
        rerank_gain(groups)
    assert words in str(err.value)


# ---------------------------------------------------------------------------- plots


def write_csv_run(root, name, steps=40):
    """A metrics.csv written by Lightning's own CSVLogger: sparse rows as in training."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(root, name=name)
    for step in range(0, steps, 2):
        logger.log_metrics({"train/loss": 8.0 / (1 + step), "train/image_loss": 9.0 / (1 + step),
                            "train/grad_norm": 1.0}, step=step)
        if step % 10 == 8:
            logger.log_metrics({"val/loss": 9.0 / (1 + step), "epoch": 0}, step=step)
    logger.save()
    return root / name / "version_0" / "metrics.csv"


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_read_metrics_csv_and_run_name(tmp_path):
    path = write_csv_run(tmp_path, "t2i")
    series = read_metrics_csv(path)
    assert set(series) == {"train/loss", "train/image_loss", "train/grad_norm", "val/loss"}
    assert series["train/loss"][:2] == [(0.0, 8.0), (2.0, 8.0 / 3)]
    assert [step for step, _ in series["val/loss"]] == [8.0, 18.0, 28.0, 38.0]
    assert run_name(path) == "t2i"


def test_plot_loss_curves(tmp_path):
    a, b = write_csv_run(tmp_path, "t2i"), write_csv_run(tmp_path, "caption", steps=20)
    two_panels = plot_loss_curves({"t2i": a, "caption": b}, tmp_path / "out" / "loss.png",
                                  smooth=0.5)
    width_two, height = png_size(two_panels)  # panels "loss" (train + val) and "image_loss"
    one_panel = plot_loss_curves([a, b], tmp_path / "one.png", metrics=["train/loss"], log_y=False)
    width_one, _ = png_size(one_panel)
    assert width_two > 1.6 * width_one and height > 200
    pixels = np.asarray(Image.open(one_panel).convert("RGB"))
    assert (np.abs(pixels.astype(int) - (31, 119, 180)).sum(-1) < 30).sum() > 50  # run 1 (C0)
    assert (np.abs(pixels.astype(int) - (255, 127, 14)).sum(-1) < 30).sum() > 50  # run 2 (C1)


@pytest.mark.parametrize("kwargs, words", [
    (dict(runs="missing/metrics.csv"), "does not exist"),
    (dict(metrics=["val/accuracy"]), "val/accuracy"),
    (dict(smooth=1.0), "smooth=1.0"),
    (dict(runs={}), "no runs"),
])
def test_plot_loss_curves_bad_input(tmp_path, kwargs, words):
    runs = kwargs.pop("runs", write_csv_run(tmp_path, "run"))
    with pytest.raises(ValueError) as err:
        plot_loss_curves(runs, tmp_path / "x.png", **kwargs)
    assert words in str(err.value)


def test_plot_accuracy_bars(tmp_path):
    results = {
        "seen": {"color": 0.97, "shape": 0.94, "position": 0.95, "size": 0.92, "full_match": 0.86,
                 "n_images": 64, "n_objects": 64},
        "heldout": {"color": 0.75, "shape": 0.9, "position": 0.98, "size": 0.81, "full_match": 0.58,
                    "n_images": 64, "n_objects": 64},
    }
    path = plot_accuracy_bars(results, tmp_path / "acc.png", targets={"seen": 0.8, "heldout": 0.4})
    width, height = png_size(path)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert (np.abs(pixels - (31, 119, 180)).sum(-1) < 30).sum() > 500  # seen bars (C0)
    assert (np.abs(pixels - (255, 127, 14)).sum(-1) < 30).sum() > 500  # heldout bars (C1)
    narrow = plot_accuracy_bars(results, tmp_path / "fm.png", attributes=["full_match"])
    assert png_size(narrow)[0] < width
    with pytest.raises(ValueError, match=r"results\['seen'\]\['color'\] = 97"):
        plot_accuracy_bars({"seen": {"color": 97}}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no results"):
        plot_accuracy_bars({}, tmp_path / "bad.png")


def test_plot_quality_curves(tmp_path):
    from cogview.eval.plots import plot_quality_curves

    curves = {
        "t2i": [{"step": s, "train_seconds": 60.0 * s, "seen_full_match": 0.2 * s,
                 "two_full_match": 0.1 * s} for s in (1, 2, 3)],
        "sr": [{"step": 1, "train_seconds": 30.0, "seen_psnr": 20.0, "seen_bicubic_psnr": 36.0}],
    }
    path = plot_quality_curves(curves, tmp_path / "curves.png", {"t2i": {"seen": 0.8}})
    width, height = png_size(path)
    one = plot_quality_curves({"t2i": curves["t2i"]}, tmp_path / "one.png")
    assert png_size(one)[0] < width and png_size(one)[1] == height  # one panel per task
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert (np.abs(pixels - (31, 119, 180)).sum(-1) < 30).sum() > 200  # seen (C0) lines
    with pytest.raises(ValueError, match="no curve panel for \\['vqvae'\\]"):
        plot_quality_curves({"vqvae": curves["sr"]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no points"):
        plot_quality_curves({"t2i": []}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no train_seconds"):
        plot_quality_curves({"sr": [{"step": 1, "seen_psnr": 20.0}]}, tmp_path / "bad.png")
