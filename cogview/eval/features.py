"""Image feature extractors (for FID) and classifiers (for IS).

Every extractor is a plain `nn.Module` mapping images float [N, 3, H, W] in [0, 1] to
features [N, D] (FID) or logits [N, C] (IS), with a `num_features` attribute (D or C).
`make_feature_extractor` / `make_classifier` build one from a spec string:

    "random" | "random:<seed>"   RandomConvFeatures: a fixed, seeded random conv net. The
                                 default for shapes-zh: no download, no training, the same
                                 numbers on every machine (see its docstring for why).
    "vqvae:<export dir>"         VQVAEFeatures: a trained VQ-VAE's encoder, pooled on a grid.
    "inception:<weights file>"   InceptionV3: the standard FID network (2048-d pool features;
                                 1008 logits for IS) from pt_inception-2015-12-05-6726825d.pth.
    "oracle" (classifiers only)  OracleClassifier: the shapes-zh oracle's colour-shape reading.

Any `nn.Module` is accepted in place of a spec and returned unchanged.

Why our own Inception-v3 and not torchmetrics' `feature_extractor_weights_path`: that path
goes through torch-fidelity, whose package `__init__` imports torchvision (for its CLIP and
VGG extractors), and PyPI's torchvision does not install beside our torch. Installed with
`--no-deps`, torch-fidelity even breaks `import torchmetrics`. `InceptionV3` below is the
same network (TensorFlow's 2015-12-05 graph as ported for FID: the weights file's parameter
names, TF1 bilinear resize to 299, max-pool in the last block) with no dependency beyond
torch; torchmetrics' FrechetInceptionDistance / InceptionScore take it as a custom module.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cogview.data.shapes import COLORS, SHAPES
from cogview.eval.oracle import read_scene
from cogview.exports import MODEL_CONFIG
from cogview.modules.vqvae import VQVAE
from cogview.validate import check_int

DEFAULT_FEATURES = "random"  # make_feature_extractor spec for shapes-zh FID
DEFAULT_CLASSIFIER = "oracle"  # make_classifier spec for shapes-zh IS


def _module_device(module: nn.Module) -> torch.device:
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------
# Random conv features (the shapes-zh default)


class RandomConvFeatures(nn.Module):
    """A fixed, seeded random conv net: images [N, 3, H, W] in [0, 1] -> features [N, D].

    Three stride-2 3x3 convs with ReLU (widths `channels`), then average pooling onto a
    `grid` x `grid` layout: D = channels[-1] * grid^2 (16 by default). Weights are drawn
    from a generator seeded with `seed` (Kaiming-normal, so activations keep their scale),
    never trained: the same numbers on every machine, nothing to download or train.

    Why this is the shapes-zh default: random conv features respond to colour (the first
    layer mixes channels) and to edges and corners (15 px receptive field). Global pooling
    (grid=1) keeps them apart from where objects sit: renders vary mostly in position, and
    position-pooled features (grid 2 or 3) drowned every other change in the sampling noise
    of layouts. Few dimensions (16) keep that noise floor low and the covariance full-rank
    for the benchmark's 64 images per split. Measured on 256 renders against 256 others
    (FID / real-vs-real FID): VQ-VAE reconstructions 2.1, blur radius 1: 4.1, radius 2: 11,
    pixel noise sigma 8: 5.2, all objects small: 17, all circles: 2.4, squares drawn as
    diamonds: 7.0, colours off the palette (RGB -> BGR): 12, all objects centred: 13. With
    64 images per set the same shifts give 1.2 to 4.3: FID needs hundreds of images. A
    trained VQ-VAE's encoder ("vqvae:<dir>") separates most shifts 1-7x more sharply, but
    ties the metric to one trained tokenizer; use it to compare runs that share it.
    """

    def __init__(self, seed: int = 0, channels: tuple[int, ...] = (32, 64, 16), grid: int = 1):
        super().__init__()
        check_int("grid", grid)
        if not channels:
            raise ValueError(f"channels={channels} must name at least one conv width")
        generator = torch.Generator().manual_seed(int(seed))
        layers: list[nn.Module] = []
        width = 3
        for out in channels:
            conv = nn.Conv2d(width, out, kernel_size=3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.normal_(0.0, (2.0 / (width * 9)) ** 0.5, generator=generator)
                conv.bias.normal_(0.0, 0.1, generator=generator)
            layers += [conv, nn.ReLU()]
            width = out
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid), nn.Flatten())
        self.net.requires_grad_(False)
        self.seed, self.grid = int(seed), int(grid)
        self.num_features = channels[-1] * grid * grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, D]."""
        return self.net(images * 2.0 - 1.0)  # (N, D)


# ----------------------------------------------------------------------------------------
# VQ-VAE encoder features


class VQVAEFeatures(nn.Module):
    """A trained VQ-VAE's encoder latents (before quantization), average-pooled onto a
    `grid` x `grid` layout: images [N, 3, H, W] in [0, 1] -> [N, code_dim * grid^2].

    On shapes-zh (the demo's tiny VQ-VAE, grid=1, 256 images per set) this separates most
    synthetic shifts 1-7x more sharply than RandomConvFeatures (FID / real-vs-real FID:
    blur radius 1: 5.5, all circles: 7.4, all objects small: 79), but it measures in the
    space of one trained tokenizer, and its 64 dimensions want well over 64 images.
    """

    def __init__(self, vqvae: nn.Module, grid: int = 1):
        super().__init__()
        self.vqvae = vqvae.eval().requires_grad_(False)
        self.grid = int(grid)
        self.num_features = vqvae.config.code_dim * self.grid * self.grid

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] (H, W multiples of 8) -> [N, D]."""
        vq = self.vqvae
        pixels = (vq.prepare_images(images) - vq.pixel_mean) / vq.pixel_std  # (N, 3, H, W)
        latents = vq.encoder(pixels)  # (N, code_dim, H/8, W/8)
        return F.adaptive_avg_pool2d(latents.float(), self.grid).flatten(1)  # (N, D)


# ----------------------------------------------------------------------------------------
# Inception-v3 as used for FID (TensorFlow 2015-12-05 graph)


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x does it (align_corners=False, no half-pixel shift:
    output pixel i samples input coordinate i * in / out), which the FID graph was built on.
    [N, C, H, W] -> [N, C, size, size]."""

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64, device=images.device) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(images.dtype)

    top, bottom, wy = axis(images.shape[-2])
    left, right, wx = axis(images.shape[-1])
    rows = images[..., top, :] + (images[..., bottom, :] - images[..., top, :]) * wy[:, None]
    # rows: (N, C, size, W)
    return rows[..., left] + (rows[..., right] - rows[..., left]) * wx  # (N, C, size, size)


class ConvBN(nn.Sequential):
    """conv (no bias) -> BatchNorm (eps 1e-3, TensorFlow's) -> ReLU; parameter names
    `conv.*` and `bn.*` as in the FID weights file."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)
        self.relu = nn.ReLU()


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool ignores the zero padding at borders
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], dim=1)


class ReduceB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], dim=1)


class MixedC(nn.Module):
    """17x17 block with factorised 7x7 convs (Mixed_6b..6e)."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, **row)
        self.branch7x7_3 = ConvBN(c7, 192, **col)
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, **row)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for k in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{k}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], dim=1)


class ReduceD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = x
        for k in range(1, 5):
            seven = getattr(self, f"branch7x7x3_{k}")(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven,
                          F.max_pool2d(x, 3, stride=2)], dim=1)


class MixedE(nn.Module):
    """8x8 block with split 1x3/3x1 convs (Mixed_7b, 7c). The FID graph pools the last
    block's pool branch with a max-pool (`max_pool=True`), the one before with an average."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, **row)
        self.branch3x3_2b = ConvBN(384, 384, **col)
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, **row)
        self.branch3x3dbl_3b = ConvBN(384, 384, **col)
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        three = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(three), self.branch3x3_2b(three),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], dim=1)


class InceptionV3(nn.Module):
    """Inception-v3 as used for FID and IS: images [N, 3, H, W] in [0, 1] -> pool features
    [N, 2048] (`output="pool"`) or logits [N, 1008] (`output="logits"`, without the fc bias,
    as torch-fidelity's "logits_unbiased" that IS uses).

    Images are quantised to 0..255 (as the reference implementation reads uint8 images),
    resized to 299x299 with TF1 bilinear resizing and scaled to [-1, 1]. Load the standard
    weights with `InceptionV3.from_file(path)`.
    """

    image_size = 299
    outputs = {"pool": 2048, "logits": 1008}

    def __init__(self, output: str = "pool"):
        super().__init__()
        if output not in self.outputs:
            raise ValueError(f"InceptionV3 output={output!r} is unknown; use one of "
                             f"{list(self.outputs)}")
        self.output = output
        self.num_features = self.outputs[output]
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = ReduceB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = ReduceD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path, output: str = "pool") -> "InceptionV3":
        """Loads the standard FID weights (pytorch-fid's pt_inception-2015-12-05-6726825d.pth,
        or torch-fidelity's weights-inception-2015-12-05-6726825d.pth: the same tensors)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(
                f"Inception weights file {str(path)!r} does not exist; download "
                "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID weights) and pass "
                "its path as 'inception:/path/to/pt_inception-2015-12-05-6726825d.pth'")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = cls(output)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # BatchNorm's step counter is unused in eval mode; older files lack it
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"{path} is not an FID Inception-v3 state dict: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (of {len(missing)} / {len(unexpected)}); use "
                "pt_inception-2015-12-05-6726825d.pth")
        return model

    def train(self, mode: bool = True) -> "InceptionV3":
        """Always stays in eval mode (batch norm uses its stored statistics)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> [N, 2048] or [N, 1008]."""
        x = (images.float().clamp(0, 1) * 255).round()  # (N, 3, H, W) as uint8 values
        x = resize_bilinear_tf1(x, self.image_size)  # (N, 3, 299, 299)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048)
        if self.output == "pool":
            return pool
        return pool @ self.fc.weight.T  # (N, 1008)


# ----------------------------------------------------------------------------------------
# shapes-zh oracle as a classifier (for IS)


class OracleClassifier(nn.Module):
    """The shapes-zh oracle as an IS classifier: images [N, 3, S, S] in [0, 1] -> logits
    [N, 29] over the 28 colour-shape pairs plus "no object".

    p(y | image) splits evenly over the colour-shape pairs of the objects the oracle reads
    back (a two-object image is half one class, half the other); logits are log p, with
    absent classes at log(1e-12) so that softmax gives p back. IS is then exp of the mutual
    information between images and colour-shape classes: up to 28 for a set that covers
    every pair evenly with clean, readable objects, 1 when every image reads the same.
    """

    def __init__(self):
        super().__init__()
        self.classes = [(c, s) for c in COLORS for s in SHAPES] + [("", "")]  # last: no object
        self.index = {pair: i for i, pair in enumerate(self.classes)}
        self.num_features = len(self.classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] in [0, 1] -> [N, 29]."""
        probs = torch.zeros(images.shape[0], self.num_features, dtype=torch.float64)  # (N, 29)
        for i, image in enumerate(images.detach().cpu()):
            objects = read_scene(image)["objects"]
            if not objects:
                probs[i, -1] = 1.0
            for obj in objects:
                probs[i, self.index[(obj["color"], obj["shape"])]] += 1.0 / len(objects)
        return probs.clamp_min(1e-12).log()  # (N, 29)


# ----------------------------------------------------------------------------------------
# Specs


def _split_spec(spec: str, kinds: tuple[str, ...]) -> tuple[str, str]:
    kind, _, arg = spec.partition(":")
    if kind not in kinds:
        forms = ", ".join("'random[:seed]'" if k == "random" else f"'{k}:...'" for k in kinds)
        raise ValueError(f"feature spec {spec!r} is unknown; use one of {forms} or pass an "
                         "nn.Module")
    return kind, arg


def make_feature_extractor(spec: str | nn.Module = DEFAULT_FEATURES) -> nn.Module:
    """FID feature extractor from a spec ("random[:seed]", "vqvae:<dir>",
    "inception:<weights file>") or an nn.Module (returned as is): images float
    [N, 3, H, W] in [0, 1] -> features [N, D]."""
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"feature extractor must be a spec string or an nn.Module, got "
                         f"{type(spec).__name__}")
    kind, arg = _split_spec(spec, ("random", "vqvae", "inception"))
    if kind == "random":
        try:
            return RandomConvFeatures(seed=int(arg) if arg else 0)
        except ValueError:
            raise ValueError(f"feature spec {spec!r}: the seed must be an int, "
                             "e.g. 'random:0'") from None
    if not arg:
        raise ValueError(f"feature spec {spec!r} needs a path after the colon, e.g. '{kind}:/path'")
    if kind == "inception":
        return InceptionV3.from_file(arg, output="pool")
    if not (Path(arg) / MODEL_CONFIG).is_file():
        raise ValueError(f"feature spec {spec!r}: {arg!r} is not a VQ-VAE export directory "
                         "(no config.json); pass e.g. 'vqvae:artifacts/demo/vqvae'")
    return VQVAEFeatures(VQVAE.from_pretrained(arg))


def make_classifier(spec: str | nn.Module = DEFAULT_CLASSIFIER) -> nn.Module:
    """IS classifier from a spec ("oracle", "inception:<weights file>") or an nn.Module
    (returned as is): images float [N, 3, H, W] in [0, 1] -> logits [N, C]."""
    if isinstance(spec, nn.Module):
        return spec
    if spec == "oracle":
        return OracleClassifier()
    if not isinstance(spec, str) or not spec.startswith("inception:") or spec == "inception:":
        raise ValueError(f"classifier spec {spec!r} is unknown; use 'oracle', "
                         "'inception:<weights file>' or pass an nn.Module returning logits")
    return InceptionV3.from_file(spec.partition(":")[2], output="logits")
