"""Real images with captions, for the methods that need data (PCM, paper Alg. 1); RAPM itself never does.

``real_data = "digits"`` is the digits teacher's train split (the split that trained it), each image captioned by
one of its digit's training phrasings; ``"scenes"`` draws of the scenes teacher's world (a built-in teacher's name:
its plug-in's ``real_items``). Any other value is a folder of images (``.png``, ``.jpg``, ``.jpeg``,
``.webp``), each with a caption file of the same name and ``.txt`` suffix; images are resized (shorter side) and
centre-cropped to the teacher's resolution, then encoded by the teacher's VAE (the mean of its posterior, times its
scaling factor). Captions are encoded once by the teacher's text encoders, which are then let go: training keeps
the latents and the embeddings of the distinct captions, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rapm.conditioning import Conditioning
from rapm.config import ConfigError
from rapm.families import BUILTIN_NAMES, BUILTIN_TEACHERS
from rapm.metrics_sd import IMAGE_SUFFIXES  # the image files rapm reads from a user's folder
from rapm.plugins import plugin_for
from rapm.teacher import load_teacher


@dataclass
class RealData:
    """Latents [K, C, H, W] (CPU, float32), and for each a row of ``captions`` (a conditioning per distinct caption)."""

    latents: torch.Tensor
    caption_index: torch.Tensor  # [K] long
    captions: Conditioning
    texts: list[str]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, Conditioning]:
        return self.latents[indices], self.captions[self.caption_index[indices]]


def _builtin_items(name: str) -> tuple[torch.Tensor, list[str]]:
    """A built-in teacher's real data (its plug-in's): the digits train split, the scenes world's draws."""
    return plugin_for(name).real_items()


def _folder_items(folder: Path, size: int) -> tuple[torch.Tensor, list[str]]:
    import numpy as np
    from PIL import Image

    if not folder.is_dir():
        raise ConfigError(f"config field 'real_data': {folder} is not a directory; give {BUILTIN_NAMES} or a folder of images "
                          f"with a caption .txt beside each")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"config field 'real_data': {folder} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    images, texts = [], []
    for f in files:
        caption = f.with_suffix(".txt")
        if not caption.exists():
            raise ConfigError(f"{caption} is missing: every image in real_data needs a caption file beside it")
        try:
            img = Image.open(f).convert("RGB")
        except Exception as e:  # PIL raises many kinds
            raise ConfigError(f"{f}: cannot be read as an image ({type(e).__name__}: {e}); remove or replace it") from None
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        texts.append(caption.read_text().strip())
    return torch.stack(images), texts


@torch.no_grad()
def load_real_data(spec: str, teacher_path: str, device: torch.device | str = "cpu", batch_size: int = 16,
                   dtype: torch.dtype = torch.float32, unet: torch.nn.Module | None = None) -> RealData:
    """Real data ``spec`` (a built-in teacher's name or a folder) encoded for the teacher at ``teacher_path``; see the module docstring.

    ``unet``: training's UNet, so that only the text encoders and the VAE are loaded (never a second UNet).
    """
    teacher = load_teacher(teacher_path, device=device, dtype=dtype, text_encoders=True, vae=True, unet=unet)
    images, texts = _builtin_items(spec) if spec in BUILTIN_TEACHERS else _folder_items(Path(spec), teacher.image_size)
    if teacher.vae is None:  # a pixel-space teacher (digits): the images are the latents
        channels = teacher.latent_shape[0]
        if images.shape[1:] != teacher.latent_shape:
            if images.shape[1] == 3 and channels == 1:
                images = images.mean(1, keepdim=True)
            if images.shape[1:] != teacher.latent_shape:
                raise ConfigError(f"config field 'real_data': images of shape {tuple(images.shape[1:])} do not fit the "
                                  f"teacher's {teacher.latent_shape}")
        latents = images.float()
    else:
        vae = teacher.vae
        factor = float(getattr(vae.config, "scaling_factor", 0.18215))
        shift = float(getattr(vae.config, "shift_factor", None) or 0.0)  # the inverse of Teacher.decode
        latents = torch.cat([vae.encode(images[i:i + batch_size].to(device, vae.dtype)).latent_dist.mean.float().cpu()
                             for i in range(0, len(images), batch_size)])
        latents = (latents - shift) * factor
    distinct = sorted(set(texts))
    where = {t: i for i, t in enumerate(distinct)}
    conds = [teacher.encode_prompts(distinct[i:i + batch_size])[0].to("cpu", torch.float32)
             for i in range(0, len(distinct), batch_size)]
    return RealData(latents, torch.tensor([where[t] for t in texts]), Conditioning.cat(conds), distinct)
