"""Teacher plug-ins: what a teacher folder brings beyond its diffusers pipeline, named in the folder's own
``rapm.json`` (the built-in digits teacher's is ``rapm/demo/teacher/rapm.json``):

- ``guidance``: the classifier-free guidance its trajectories use by default (else its family's);
- ``preset`` and ``presets``: its training preset's name, and presets it adds to ``rapm.config.PRESETS``;
- ``plugin``: a module whose ``PLUGIN`` (a ``TeacherPlugin``) gives its own metrics (validation and ``rapm
  evaluate``), its default evaluation prompts, its real data (PCM's ``real_data``) and a feature network (RDD).

The core reads the file and imports the named module by name: no core module imports a plug-in, and a teacher
without ``rapm.json`` is a plain diffusers teacher.
"""

from __future__ import annotations

import importlib
import json
from functools import lru_cache
from pathlib import Path

from rapm.distribution import frechet_distance
from rapm.families import BUILTIN_TEACHERS, resolve_teacher_path

TEACHER_FILE = "rapm.json"


class TeacherPlugin:
    """The interface of a plug-in's ``PLUGIN``; a plug-in implements what its teacher has."""

    name: str = ""

    def metrics(self):
        """An object with ``features(images)``, ``reference_features``, ``prompt_accuracy(images, labels)`` and
        ``real_floor(n)``: the teacher's own image metrics."""
        raise NotImplementedError

    def label_of(self, prompt: str):
        """What a prompt asks for, as ``metrics().prompt_accuracy`` reads it."""
        raise NotImplementedError

    def frechet_distance(self, a, b) -> float:
        """The Fréchet distance of two feature sets [n, d] (``rapm.distribution``'s, unless a plug-in has its own)."""
        return frechet_distance(a, b)

    def evaluation_prompts(self, n: int) -> list[str]:
        raise NotImplementedError

    def real_items(self):
        """(images [B, C, H, W] in [-1, 1], captions): the real data the teacher was trained on."""
        raise NotImplementedError

    def feature_net(self, device):
        """A frozen network on clean images: (module images -> feature maps, its channel count)."""
        raise NotImplementedError

    def feature_shape(self) -> tuple[int, ...]:
        """The image shape ``feature_net`` reads."""
        raise NotImplementedError


@lru_cache(maxsize=None)
def _teacher_file(folder: str) -> dict:
    f = Path(folder) / TEACHER_FILE
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}


def teacher_file(teacher) -> dict:
    """The teacher's ``rapm.json`` ({} if it has none); ``teacher`` a loaded Teacher, a folder or a built-in teacher's name."""
    path = teacher.path if hasattr(teacher, "path") else resolve_teacher_path(teacher)
    return _teacher_file(str(Path(path).resolve()))


def plugin_for(teacher) -> TeacherPlugin | None:
    """The plug-in the teacher's ``rapm.json`` names, or None."""
    name = teacher_file(teacher).get("plugin")
    return importlib.import_module(name).PLUGIN if name else None


def builtin_presets() -> dict[str, dict]:
    """The presets the built-in teachers' files add."""
    out: dict[str, dict] = {}
    for name in BUILTIN_TEACHERS:
        out.update(teacher_file(name).get("presets", {}))
    return out
