"""FID and CLIP score of SD/SDXL images, through torchmetrics, from files the user has on disk.

Nothing is downloaded. The user gives:

* ``fid_features``: a feature network for FID. The standard file is the TorchScript Inception
  of StyleGAN2-ADA and clean-fid, ``inception-2015-12-05.pt``, called as
  ``net(images_uint8, return_features=True)`` -> [N, 2048]; it resizes to 299x299 itself, so
  images go in at their own size. Any TorchScript network (``torch.jit.save``) taking uint8
  images [N, 3, H, W] in [0, 255] and returning features [N, D] works too: if it
  accepts ``return_features=True`` it is called that way, as it is; otherwise it is called
  plainly on images first resized to 299x299 (bilinear), the Inception's input size.
* ``reference_images``: a folder of real images (.png/.jpg/.jpeg/.webp, read as RGB) that
  the generated images are compared with. Give them at the generated resolution (square,
  center-cropped) for a fair FID; images of other sizes are fed as they are.
* ``clip``: a folder saved with ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained``
  (e.g. ``openai/clip-vit-base-patch16`` saved locally).

FID (Heusel et al. 2017) is torchmetrics' ``FrechetInceptionDistance`` with this network as its
``feature`` module; CLIP score (Hessel et al. 2021) is torchmetrics' ``CLIPScore``: the mean over
samples of 100 * cos(image embedding, prompt embedding), floored at 0 (torchmetrics floors the
mean). FID of a finite sample is biased upward, the more so the fewer the images: compare
FIDs only at the same numbers of generated and reference images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from rapm.errors import RapmError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
INCEPTION_SIZE = 299
FID_FEATURES_HELP = ("a TorchScript feature network such as the StyleGAN2-ADA / clean-fid Inception "
                     "inception-2015-12-05.pt")
CLIP_HELP = ("a folder saved with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained "
             "(config.json, processor_config.json, tokenizer files), e.g. openai/clip-vit-base-patch16 saved locally")


class MetricFilesError(RapmError):
    pass


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] as uint8 [0, 255], rounded as a saved PNG is."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def reference_image_paths(folder: str | Path) -> list[Path]:
    """The images directly in ``folder`` (sorted), or an error saying what the folder should hold."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MetricFilesError(f"--reference-images {folder}: no such folder; give a folder of real "
                               f"{'/'.join(IMAGE_SUFFIXES)} images to compute FID against")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) < 2:
        raise MetricFilesError(f"--reference-images {folder}: {len(paths)} images ({'/'.join(IMAGE_SUFFIXES)}) "
                               "directly in the folder; FID needs at least 2 (thousands for a meaningful value)")
    return paths


def read_image(path: Path) -> torch.Tensor:
    """One image file as uint8 RGB [3, H, W]."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except OSError as e:
        raise MetricFilesError(f"--reference-images: {path} is not a readable image ({e}); remove it or replace it") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def check_metric_files(fid_features: str | Path | None, reference_images: str | Path | None,
                       clip: str | Path | None) -> None:
    """Refuse missing or incomplete metric inputs, before a model is loaded or an image generated."""
    if (fid_features is None) != (reference_images is None):
        given, missing = ("--fid-features", "--reference-images") if reference_images is None else (
            "--reference-images", "--fid-features")
        raise MetricFilesError(f"{given} is given without {missing}: FID needs both the feature network "
                               "and a folder of real images; give both, or neither to skip FID")
    if fid_features is not None:
        if not Path(fid_features).is_file():
            raise MetricFilesError(f"--fid-features {fid_features}: no such file; give {FID_FEATURES_HELP}")
        reference_image_paths(reference_images)
    if clip is not None:
        folder = Path(clip)
        if not folder.is_dir():
            raise MetricFilesError(f"--clip {clip}: no such folder; give {CLIP_HELP}")
        if not (folder / "config.json").is_file():
            raise MetricFilesError(f"--clip {clip}: config.json is missing; give {CLIP_HELP}")
        # transformers 5 saves the processor as processor_config.json, earlier versions as preprocessor_config.json
        if not any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
            raise MetricFilesError(f"--clip {clip}: processor_config.json (or preprocessor_config.json) is missing; "
                                   f"give {CLIP_HELP}")


class FidFeatures(torch.nn.Module):
    """A feature network as torchmetrics' FID ``feature`` module: uint8 images [N, 3, H, W] -> [N, D] floats."""

    def __init__(self, network: torch.nn.Module, return_features: bool, num_features: int):
        super().__init__()
        self.network = network
        self.return_features = return_features
        self.num_features = num_features  # read by torchmetrics, which then does not probe with a dummy image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.return_features:  # StyleGAN2-ADA / clean-fid Inception: resizes to 299 itself
            features = self.network(images, return_features=True)
        else:
            if tuple(images.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
                images = torch.nn.functional.interpolate(
                    images.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                ).round().clamp(0, 255).to(torch.uint8)
            features = self.network(images)
        return features.flatten(1).float()


def load_fid_features(path: str | Path, device: str = "cpu") -> FidFeatures:
    """Load a feature network and find how it is called by calling it once on two blank 299x299 images."""
    path = Path(path)
    if not path.is_file():
        raise MetricFilesError(f"--fid-features {path}: no such file; give {FID_FEATURES_HELP}")
    try:
        network = torch.jit.load(str(path), map_location=device).eval()
    except Exception as e:  # torch.jit.load raises RuntimeError or ValueError, by version and file
        raise MetricFilesError(f"--fid-features {path}: not a TorchScript file (torch.jit.load: "
                               f"{str(e).strip().splitlines()[0]}); give {FID_FEATURES_HELP}") from None
    probe = torch.zeros(2, 3, INCEPTION_SIZE, INCEPTION_SIZE, dtype=torch.uint8, device=device)
    with torch.no_grad():
        try:
            features, return_features = network(probe, return_features=True), True
        except Exception as keyword_error:  # no return_features argument: a plain network
            try:
                features, return_features = network(probe), False
            except Exception as plain_error:
                raise MetricFilesError(
                    f"--fid-features {path}: the network fails on uint8 images [2, 3, 299, 299] "
                    f"(with return_features=True: {str(keyword_error).strip().splitlines()[0]}; "
                    f"without: {str(plain_error).strip().splitlines()[0]}); give {FID_FEATURES_HELP}") from None
    if not isinstance(features, torch.Tensor) or features.ndim < 2 or features.shape[0] != 2 or (
            features.ndim > 2 and features.shape[2:].numel() != 1):
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise MetricFilesError(f"--fid-features {path}: the network returns {shape} for 2 images, not features "
                               f"[2, D]; give {FID_FEATURES_HELP}")
    return FidFeatures(network, return_features, int(features.flatten(1).shape[1])).eval()


class _ClipEmbeddings(torch.nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors, as torchmetrics expects
    (transformers 5 returns a model output holding them as ``pooler_output``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads the text length limit here

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values, **kwargs))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs))


def load_clip(folder: str | Path, device: str = "cpu"):
    """(model, processor) from a local CLIP folder, for torchmetrics' CLIPScore."""
    from transformers import CLIPModel, CLIPProcessor

    check_metric_files(None, None, folder)
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MetricFilesError(f"--clip {folder}: cannot be loaded as a CLIP model and processor "
                               f"({str(e).strip().splitlines()[0]}); give {CLIP_HELP}") from None
    return _ClipEmbeddings(model), processor


class SdMetrics:
    """FID against the reference images and CLIP score against the prompts, each when its files are given.

    The files are loaded and the reference images' features computed on construction, so that a
    bad file fails before any image is generated. A metric without its files returns None, and
    ``notes`` says why in one line.
    """

    def __init__(self, fid_features: str | Path | None = None, reference_images: str | Path | None = None,
                 clip: str | Path | None = None, device: str = "cpu", batch_size: int = 32):
        check_metric_files(fid_features, reference_images, clip)
        self.device, self.batch_size = device, batch_size
        self.fid_metric = self.clip_metric = None
        self.reference_count = 0
        self.notes: list[str] = []
        if fid_features is not None:
            from torchmetrics.image.fid import FrechetInceptionDistance

            network = load_fid_features(fid_features, device)
            self.fid_metric = FrechetInceptionDistance(feature=network, reset_real_features=False).to(device)
            paths = reference_image_paths(reference_images)
            self.reference_count = len(paths)
            with torch.no_grad():
                for batch in _same_size_batches(paths, batch_size):
                    self.fid_metric.update(batch.to(device), real=True)
        else:
            self.notes.append("FID not computed: give --fid-features (the Inception network) and --reference-images "
                              "(a folder of real images).")
        if clip is not None:
            from torchmetrics.multimodal.clip_score import CLIPScore

            model, processor = load_clip(clip, device)
            self.clip_metric = CLIPScore(model_name_or_path=lambda: (model, processor)).to(device)
        else:
            self.notes.append("CLIP score not computed: give --clip (a local CLIP model folder).")

    def fid(self, images: torch.Tensor) -> float | None:
        """FID of images [N, 3, H, W] in [-1, 1] against the reference images (None without the files)."""
        if self.fid_metric is None:
            return None
        self.fid_metric.reset()  # keeps the reference statistics
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                self.fid_metric.update(to_uint8(images[i:i + self.batch_size]).to(self.device), real=False)
            return max(float(self.fid_metric.compute()), 0.0)

    def clip_score(self, images: torch.Tensor, prompts: Sequence[str]) -> float | None:
        """CLIP score of images [N, 3, H, W] in [-1, 1] against their prompts (None without the files)."""
        if self.clip_metric is None:
            return None
        if len(images) != len(prompts):
            raise ValueError(f"one prompt per image: got {len(images)} images and {len(prompts)} prompts")
        self.clip_metric.reset()
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                self.clip_metric.update(to_uint8(images[i:i + self.batch_size]).to(self.device),
                                        list(prompts[i:i + self.batch_size]))
            return float(self.clip_metric.compute())


def _same_size_batches(paths: Sequence[Path], batch_size: int):
    """uint8 batches [B, 3, H, W] of consecutive images of the same size."""
    batch: list[torch.Tensor] = []
    for path in paths:
        image = read_image(path)
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield torch.stack(batch)
