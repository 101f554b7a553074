"""RDD's relational loss (Feng et al. 2024, Relational Diffusion Distillation, arXiv 2410.07679), as a term any
method can add (``rdd_weight``): ``progressive-rdd`` is progressive distillation with it; ``rapm``, ``rapm-paper``,
``rapm-relative`` and ``sfd`` take it with ``--set rdd_weight=W``.

The term compares features of a teacher target and of the student's prediction (both clean images or latents). Two
feature sources (``rdd_features``):

- ``teacher`` (the default for every teacher but digits): the frozen teacher's own UNet (teacher role, adapters
  off), its mid-block output, with both images re-noised to t = ``FEATURE_TIMESTEP`` (100) with the same noise and
  run under the sample's own prompt. The mid block is the UNet's deepest, lowest-resolution map, the counterpart of
  the classifier's last convolutional map that RDD uses (SD 1.5 at 512 px: 1280 channels x 8 x 8; SDXL at 1024 px:
  1280 x 32 x 32); the forward stops there (the down half of the UNet). The block and t were chosen by the probe of
  benchmarks/rdd.py on the digits teacher (its figures: benchmarks/results/rdd.md): of the down blocks and the mid
  block, the mid block separates the digits best, near t = 100. A slightly noised input keeps the UNet in its
  trained range rather than at t ~ 0 (DIFT, Tang et al. 2023, reads SD's semantic features at t = 261).
  Gradients reach the prediction through the frozen teacher; the teacher's weights get none (its base weights are
  frozen and the adapters are off in the teacher role).
- ``classifier`` (the default for the digits teacher, as RDD's released code: a frozen classifier trained on the
  same data): the digits classifier's last convolutional map, 64 channels x 4 x 4 pixels.

Three terms, weighted as RDD's released code (docs/references.md):

    L = L_CFD + 1.0 L_ISP2P + 0.1 L_MP2P

- L_CFD: KL(softmax(f_T / 0.9) || softmax(f_S / 0.9)) over the spatially pooled feature channels (RDD's
  temperature 0.9; on both sides, the usual distillation form, so the loss is zero when the features agree).
- L_ISP2P (inter-sample pixel-to-pixel): every pixel feature of every sample of the batch, L2-normalised; the
  cosine similarities of each pixel to all pixels of the batch form a distribution (softmax at temperature
  ``tau``); KL between the teacher's and the student's distributions, averaged over pixels. It needs two samples
  or more: at batch size 1 it is left out and the term is L_CFD + 0.1 L_MP2P (the queue holds the other samples'
  teacher features), so RAPM's batch 1 (the paper's) can take the term.
- L_MP2P (memory pixel-to-pixel): the same against a queue of past teacher pixel features, the student's passing
  through a trainable 1x1-conv projection head first. RDD keeps 20,000 features and contrasts 4,096 of them at
  temperature 0.1; the digits benchmark's whole training sees fewer pixels than that, so the queue here holds
  ``queue_size`` = 4,096 (all contrasted).

RDD does not state the ISP2P temperature where we could read it; we use MP2P's 0.1 for both (our choice).

Where the term applies: progressive distillation, on its x-target and the student's x^ (one per sample); rapm and
sfd, on the student's end point z_0 against the stored teacher end point z~_0 (the last slot only: the images a
user sees, and one feature pass per iteration rather than N).

Cost: the teacher source makes passes of its own. None that the methods already make can serve: RAPM's
discriminator pass runs in the discriminator role (its own LoRA on, trained against the student, at a random
t_gan), SFD makes no teacher pass at all, and progressive's teacher passes see z_t, not x~. Per iteration: the down
half of the UNet (to the mid block) on B rows without gradient (the target), and on B rows with the backward to
the prediction (two passes, not one of 2B rows, so that the target's activations are not kept); what that costs on
an SD-1.5-shaped UNet is in benchmarks/results/rdd.md (benchmarks/rdd.py cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from rapm.config import ConfigError
from rapm.diffusion import add_noise
from rapm.discriminator import backbone_features
from rapm.families import BUILTIN_NAMES
from rapm.plugins import plugin_for
from rapm.roles import teacher_role

CFD_TEMPERATURE = 0.9  # RDD's code
ISP2P_WEIGHT, MP2P_WEIGHT = 1.0, 0.1  # RDD's code
TEMPERATURE = 0.1  # RDD's MP2P temperature; used for ISP2P too (our choice)
DEFAULT_WEIGHT = 1.0  # progressive-rdd's weight of the term beside the x-target loss (our choice)
FEATURE_TIMESTEP = 100  # where the teacher source reads its features (see the module docstring)
FEATURE_SOURCES = ("teacher", "classifier")


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
    """RDD's loss between teacher and student feature maps [B, C, H, W]; holds MP2P's projection head and queue."""

    def __init__(self, channels: int, queue_size: int = 4096, tau: float = TEMPERATURE):
        super().__init__()
        self.tau = tau
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

    def forward(self, teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of student features against teacher features (no gradient to the latter); then the queue takes
        the teacher's pixels. ISP2P is left out at batch size 1 (see the module docstring)."""
        teacher = teacher.detach()
        cfd = channel_distillation(teacher, student)
        mp = self.memory_relations(teacher, student)
        loss, logs = cfd + MP2P_WEIGHT * mp, {"rdd_cfd": cfd.item(), "rdd_mp2p": mp.item()}
        if teacher.shape[0] > 1:
            isp = inter_sample_pixel_relations(teacher, student, self.tau)
            loss = loss + ISP2P_WEIGHT * isp
            logs["rdd_isp2p"] = isp.item()
        self.enqueue(teacher)
        logs["rdd"] = loss.item()
        return loss, logs


class TeacherFeatures:
    """The frozen teacher's mid-block output at t = ``timestep`` of clean images re-noised there (teacher role)."""

    needs_noise = True

    def __init__(self, unet: nn.Module, schedule, timestep: int = FEATURE_TIMESTEP):
        self.unet, self.schedule, self.timestep = unet, schedule, timestep
        self.channels = int(unet.config.block_out_channels[-1])

    def __call__(self, x: torch.Tensor, noise: torch.Tensor, cond) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.timestep, device=x.device)
        z = add_noise(self.schedule, x, t, noise)
        with teacher_role(self.unet):  # adapters off: the frozen teacher; the forward stops after the mid block
            return backbone_features(self.unet, z, t, cond, "down_mid")[-1]


class ClassifierFeatures:
    """A teacher plug-in's frozen feature network on clean images (the digits classifier's last convolutional map:
    images [B, 1, 16, 16] -> [B, 64, 4, 4])."""

    needs_noise = False

    def __init__(self, device, plugin):
        self.net, self.channels = plugin.feature_net(device)  # the teacher plug-in's (rapm.plugins)

    def __call__(self, x: torch.Tensor, noise, cond) -> torch.Tensor:
        return self.net(x.float())


class RelationalTerm(nn.Module):
    """RDD's relational loss as a term of a method's loss: ``weight * term(ctx, prediction, target, cond)``.

    One implementation for every method; a method calls it on its student prediction and its teacher target (clean
    images or latents, [B, C, H, W]) and adds ``weight`` times the result. Holds the feature source (not a submodule:
    the teacher's UNet or the classifier are frozen and never saved) and the loss with its head and queue.
    """

    def __init__(self, source, weight: float, queue_size: int):
        super().__init__()
        self.weight = weight
        self.__dict__["source"] = source  # kept out of the module tree (and out of state_dict)
        self.loss = RelationalLoss(source.channels, queue_size)

    @property
    def kind(self) -> str:
        return "teacher" if isinstance(self.source, TeacherFeatures) else "classifier"

    def forward(self, ctx, prediction: torch.Tensor, target: torch.Tensor, cond) -> tuple[torch.Tensor, dict[str, float]]:
        noise = ctx.randn(target) if self.source.needs_noise else None  # the same noise for both: only the images differ
        with torch.no_grad():
            ft = self.source(target.float(), noise, cond)
        fs = self.source(prediction.float(), noise, cond)
        return self.loss(ft, fs)

    def trainable(self) -> dict[str, nn.Parameter]:
        """MP2P's projection head, trained with the student (prefixed ``rdd.``)."""
        return dict(self.loss.projection.named_parameters(prefix="rdd.projection"))

    def state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.loss.state_dict().items()}

    def load_state(self, state: dict) -> None:
        self.loss.load_state_dict({k: v for k, v in state.items() if not k.startswith("features.")}, strict=True)


def rdd_features_of(config) -> str:
    """The feature source: the config's, else the teacher's own (the classifier of a built-in teacher's plug-in,
    the teacher's UNet for the rest)."""
    return config.rdd_features or ("classifier" if plugin_for(config.teacher) is not None else "teacher")


@dataclass
class RelationalSettings:
    """What RDD's relational term needs of the config, given to a method in its constructor."""

    weight: float
    features: str  # "teacher" or "classifier"
    queue_size: int
    teacher: str = ""  # whose plug-in's classifier "classifier" is


def relational_settings(config) -> RelationalSettings:
    """The term's settings from a resolved config (``rdd_weight`` 0: off; progressive-rdd's preset sets it)."""
    weight = float(config.rdd_weight) if config.rdd_weight > 0 else 0.0
    return RelationalSettings(weight, rdd_features_of(config) if weight > 0 else "", config.rdd_queue_size,
                              config.teacher)


@dataclass
class TakesRelationalTerm:
    """A method that can add RDD's relational term (``rdd_weight`` > 0): it holds the term, builds it in ``prepare``
    and trains and saves its projection head with the student. List it before ``Method`` among the bases."""

    relational: RelationalSettings | None = field(default=None, repr=False)
    rdd: RelationalTerm | None = field(default=None, init=False, repr=False)  # built by prepare where the weight > 0

    def prepare(self, setup) -> None:
        self.rdd = build_relational_term(setup, self.relational)
        super().prepare(setup)

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        return {**super().extra_parameters(), **(self.rdd.trainable() if self.rdd is not None else {})}

    def state_dict(self) -> dict:
        return {**super().state_dict(), **({"rdd": self.rdd.state()} if self.rdd is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.rdd is not None and state.get("rdd"):
            self.rdd.load_state(state["rdd"])


def build_relational_term(setup, settings: RelationalSettings | None) -> RelationalTerm | None:
    """The term a method adds for ``settings``, or None where its weight is 0 (or there are none)."""
    if settings is None or settings.weight <= 0:
        return None
    weight = settings.weight
    kind = settings.features
    if kind == "classifier":
        plugin = plugin_for(settings.teacher)
        if plugin is None or tuple(setup.store.latent_shape) != plugin.feature_shape():
            raise ConfigError("config field 'rdd_features': 'classifier' is a built-in teacher's own classifier "
                              f"({BUILTIN_NAMES}), and {settings.teacher or 'this teacher'} has none of this shape; set "
                              "rdd_features=teacher to take the features from this teacher's own UNet")
        source = ClassifierFeatures(setup.device, plugin)
    else:
        source = TeacherFeatures(setup.unet, setup.schedule)
    return RelationalTerm(source, weight, settings.queue_size).to(setup.device)
