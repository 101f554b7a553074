"""The digits teacher's plug-in (``rapm.plugins``), named by ``rapm/demo/teacher/rapm.json``: its metrics (FD in the
digits classifier's features, prompt accuracy), held-out prompts, the train split as real data, and the classifier's
convolutional features for RDD."""

from __future__ import annotations

from rapm.demo.classifier import load_classifier
from rapm.demo.data import load_split
from rapm.demo.metrics import DigitsMetrics
from rapm.demo.prompts import digit_of, evaluation_prompts, prompts_for
from rapm.plugins import TeacherPlugin


class DigitsPlugin(TeacherPlugin):
    name = "digits"

    def metrics(self):
        return DigitsMetrics()

    def label_of(self, prompt: str):
        return digit_of(prompt)

    def evaluation_prompts(self, n: int) -> list[str]:
        return [p for p, _ in evaluation_prompts(n)]

    def real_items(self):
        train = load_split("train")
        texts = []
        for i, d in enumerate(train.digits.tolist()):
            phrasings = prompts_for(d)
            texts.append(phrasings[i % len(phrasings)])
        return train.images, texts

    def feature_net(self, device):
        """The digits classifier's last convolutional map (frozen): images [B, 1, 16, 16] -> [B, 64, 4, 4]."""
        classifier = load_classifier().to(device).eval().requires_grad_(False)
        return classifier.conv, classifier.conv[-3].out_channels  # the last conv before the final pool

    def feature_shape(self) -> tuple[int, ...]:
        return (1, 16, 16)


PLUGIN = DigitsPlugin()
