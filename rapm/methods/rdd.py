"""RDD's relational loss (Feng et al. 2024, Relational Diffusion Distillation, arXiv 2410.07679).

Features of the teacher's target image and of the student's prediction come from a frozen classifier (RDD: a
DenseNet-201 on CIFAR-10; here the digits classifier's last convolutional map, 64 channels x 4 x 4 pixels).
Three terms, weighted as RDD's released code (REFERENCES.md):

    L = L_CFD + 1.0 L_ISP2P + 0.1 L_MP2P

- L_CFD: KL(softmax(f_T / 0.9) || softmax(f_S / 0.9)) over the spatially pooled feature channels (RDD's
  temperature 0.9; on both sides, the usual distillation form, so the loss is zero when the features agree).
- L_ISP2P (inter-sample pixel-to-pixel): every pixel feature of every sample of the batch, L2-normalised; the
  cosine similarities of each pixel to all pixels of the batch form a distribution (softmax at temperature
  ``tau``); KL between the teacher's and the student's distributions, averaged over pixels.
- L_MP2P (memory pixel-to-pixel): the same against a queue of past teacher pixel features, the student's passing
  through a trainable 1x1-conv projection head first. RDD keeps 20,000 features and contrasts 4,096 of them at
  temperature 0.1; the digits benchmark's whole training sees fewer pixels than that, so the queue here holds
  ``queue_size`` = 4,096 (all contrasted).

RDD does not state the ISP2P temperature where we could read it; we use MP2P's 0.1 for both (our choice).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CFD_TEMPERATURE = 0.9  # RDD's code
ISP2P_WEIGHT, MP2P_WEIGHT = 1.0, 0.1  # RDD's code
TEMPERATURE = 0.1  # RDD's MP2P temperature; used for ISP2P too (our choice)


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) per row, averaged over rows."""
    p = F.softmax(teacher_logits.float(), dim=-1)
    return (p * (F.log_softmax(teacher_logits.float(), -1) - F.log_softmax(student_logits.float(), -1))).sum(-1).mean()


def pixels(features: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] feature maps as L2-normalised pixel features [B*H*W, C]."""
    return F.normalize(features.permute(0, 2, 3, 1).flatten(0, 2).float(), dim=1)


def channel_distillation(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """L_CFD over pooled channels."""
    return _kl(teacher.mean((2, 3)) / CFD_TEMPERATURE, student.mean((2, 3)) / CFD_TEMPERATURE)


def inter_sample_pixel_relations(teacher: torch.Tensor, student: torch.Tensor, tau: float = TEMPERATURE) -> torch.Tensor:
    """L_ISP2P: KL between the teacher's and the student's pixel-to-pixel similarity distributions over the batch."""
    pt, ps = pixels(teacher), pixels(student)
    return _kl(pt @ pt.T / tau, ps @ ps.T / tau)


class RelationalLoss(nn.Module):
    """RDD's loss around a frozen feature network ``features(images) -> [B, C, H, W]``; holds MP2P's head and queue."""

    def __init__(self, features, channels: int, queue_size: int = 4096, tau: float = TEMPERATURE):
        super().__init__()
        self.features, self.tau = features, tau
        self.projection = nn.Conv2d(channels, channels, 1)
        nn.init.eye_(self.projection.weight.data.view(channels, channels))  # starts as the identity
        nn.init.zeros_(self.projection.bias)
        self.register_buffer("queue", torch.zeros(queue_size, channels))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # features written so far

    def memory_relations(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """L_MP2P against the queue's features (zero while the queue is empty)."""
        count = int(min(self.filled.item(), self.queue.shape[0]))
        if count == 0:
            return teacher.new_zeros((), dtype=torch.float32)
        bank = self.queue[:count].clone()  # enqueue() writes the queue before backward
        pt, ps = pixels(teacher), pixels(self.projection(student.float()))
        return _kl(pt @ bank.T / self.tau, ps @ bank.T / self.tau)

    @torch.no_grad()
    def enqueue(self, teacher: torch.Tensor) -> None:
        feats = pixels(teacher)
        size = self.queue.shape[0]
        start = int(self.filled.item())
        rows = (torch.arange(feats.shape[0]) + start) % size
        self.queue[rows.to(self.queue.device)] = feats.to(self.queue.dtype)
        self.filled += feats.shape[0]

    def forward(self, teacher_images: torch.Tensor, student_images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            ft = self.features(teacher_images.float())
        fs = self.features(student_images.float())
        cfd = channel_distillation(ft, fs)
        isp = inter_sample_pixel_relations(ft, fs, self.tau)
        mp = self.memory_relations(ft, fs)
        self.enqueue(ft)
        loss = cfd + ISP2P_WEIGHT * isp + MP2P_WEIGHT * mp
        return loss, {"rdd_cfd": cfd.item(), "rdd_isp2p": isp.item(), "rdd_mp2p": mp.item()}


def digits_feature_network(device) -> tuple[callable, int]:
    """The digits classifier's last convolutional map (frozen): images [B, 1, 16, 16] -> [B, 64, 4, 4]."""
    from rapm.demo.classifier import load_classifier

    classifier = load_classifier().to(device).eval().requires_grad_(False)
    channels = classifier.conv[-3].out_channels  # the last conv before the final pool
    return classifier.conv, channels
