"""The scenes teacher's plug-in (``rapm.plugins``), named by ``rapm/scenes/teacher/rapm.json``: its metrics (prompt
accuracy read from the image, FD and precision / recall in the scenes classifier's features), evaluation prompts, draws
of the world as real data, and the classifier's convolutional features for RDD."""

from __future__ import annotations

from rapm.plugins import TeacherPlugin
from rapm.scenes.classifier import load_classifier, random_draws
from rapm.scenes.metrics import ScenesMetrics, evaluation_scenes, scene_of

REAL_ITEMS = 2000


class ScenesPlugin(TeacherPlugin):
    name = "scenes"

    def metrics(self):
        return ScenesMetrics()

    def label_of(self, prompt: str):
        return scene_of(prompt)

    def evaluation_prompts(self, n: int) -> list[str]:
        return [s.prompt() for s in evaluation_scenes(n)]

    def real_items(self):
        import numpy as np

        images, picks = random_draws(REAL_ITEMS, np.random.default_rng(30_000))
        return images, [s.prompt() for s in picks]

    def feature_net(self, device):
        """The scenes classifier's convolutional stages (frozen): images [B, 3, 32, 32] -> [B, 64, 4, 4]."""
        classifier = load_classifier().to(device).eval().requires_grad_(False)
        return classifier.conv, classifier.conv[-3].out_channels  # the last conv before the final pool

    def feature_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)


PLUGIN = ScenesPlugin()
