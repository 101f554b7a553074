"""FID and CLIP score for SD/SDXL teachers, from local files: known cases, `rapm evaluate` end to end, clear errors."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from typer.testing import CliRunner

from rapm.cli import app
from rapm.evaluate import evaluate, markdown_table
from rapm.metrics_sd import MetricFilesError, SdMetrics, load_fid_features

PROMPTS = ["a photo of a cat", "a red car", "a blue dog", "a photo of a dog"]


class TinyInception(torch.nn.Module):
    """Called as the StyleGAN2-ADA Inception is: uint8 images, any size, ``return_features=True`` -> [N, 8]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(images.float() / 127.5 - 1, size=(24, 24), mode="bilinear", align_corners=False)
        features = torch.tanh(self.conv(x)).mean((2, 3))
        return features if return_features else self.head(features)


class PlainNet(torch.nn.Module):
    """A feature network without ``return_features`` that only takes 299x299 images."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        torch._assert(images.shape[-1] == 299, "299x299 images only")
        return self.conv(images.float() / 255).mean((2, 3))


@pytest.fixture(scope="module")
def fid_net(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fid") / "tiny-inception.pt"
    torch.jit.script(TinyInception().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from rapm.demo.clip import build_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(["a", "photo", "of", "cat", "dog", "red", "blue", "car"], model_max_length=16)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _random_images(n, size, seed):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    return folder


def _signed(images_uint8):
    return images_uint8.float() / 127.5 - 1  # as Teacher.decode returns images: [-1, 1]


def _scipy_frechet(a, b):
    a, b = a.double().numpy(), b.double().numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))


def test_fid_is_zero_against_itself_and_matches_scipy_against_a_shifted_set(fid_net, tmp_path):
    real = _random_images(40, 16, seed=1)
    reference = _write_images(tmp_path / "real", real)
    metrics = SdMetrics(fid_features=fid_net, reference_images=reference)
    assert metrics.reference_count == 40 and metrics.clip_metric is None
    assert metrics.fid(_signed(real)) == pytest.approx(0.0, abs=1e-6)

    shifted = (real.int() + 60).clamp(0, 255).to(torch.uint8)
    fid = metrics.fid(_signed(shifted))
    net = torch.jit.load(str(fid_net))
    with torch.no_grad():
        expected = _scipy_frechet(net(shifted, return_features=True), net(real, return_features=True))
    assert fid > 1e-3 and fid == pytest.approx(expected, rel=1e-5)
    assert metrics.fid(_signed(real)) == pytest.approx(0.0, abs=1e-6)  # the reference statistics survive a reset


def test_a_network_without_return_features_gets_images_resized_to_299(tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.script(PlainNet().eval()).save(str(path))
    features = load_fid_features(path)
    assert not features.return_features and features.num_features == 6
    images = _random_images(3, 16, seed=2)
    resized = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False).round().to(torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(features(images), features.network(resized))


def test_clip_score_is_100_times_the_embeddings_cosine_floored_at_0(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    images = _random_images(4, 32, seed=3)
    metrics = SdMetrics(clip=clip_dir)
    assert metrics.fid_metric is None and metrics.fid(_signed(images)) is None
    score = metrics.clip_score(_signed(images), PROMPTS)

    # By hand: CLIP's pixel normalization (32x32 images need no resize or crop) and the prompts' EOS embeddings.
    model, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        image_emb = model.visual_projection(model.vision_model(pixel_values=(images / 255 - mean) / std).pooler_output)
        text_emb = torch.cat([model.text_projection(model.text_model(
            input_ids=torch.tensor([tokenizer(p)["input_ids"]])).pooler_output) for p in PROMPTS])
    cosine = F.cosine_similarity(image_emb, text_emb, dim=-1)
    expected = max(float(100 * cosine.mean()), 0.0)
    assert expected > 0  # a score above the floor, so the check means something
    assert score == pytest.approx(expected, rel=1e-4)

    with torch.no_grad():  # images pointing away from their prompts score 0, not a negative number
        metrics.clip_metric.model.model.visual_projection.weight.neg_()
    assert metrics.clip_score(_signed(images), PROMPTS) == 0.0


def test_rapm_evaluate_writes_fid_and_clip_score_for_an_sd_teacher(tiny_sd, fid_net, clip_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    reference = _write_images(tmp_path / "real", _random_images(6, 16, seed=4))
    out = tmp_path / "eval" / "evaluation.json"
    result = CliRunner().invoke(app, [
        "evaluate", "--teacher", str(tiny_sd), "--prompts", str(prompts), "--num", "4", "--reference-steps", "2",
        "--model", "teacher:ddim:1", "--fid-features", str(fid_net), "--reference-images", str(reference),
        "--clip", str(clip_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    saved = json.loads(out.read_text())
    assert [(r["method"], r["steps"]) for r in saved["rows"]] == [("teacher-ddim", 2), ("teacher-ddim", 1)]
    for row in saved["rows"]:
        assert math.isfinite(row["fid"]) and row["fid"] > 0 and math.isfinite(row["clip_score"])
    assert saved["fid_reference_images"] == 6 and saved["notes"] == []
    table = out.with_suffix(".md").read_text()
    assert "FID ↓ | CLIP score ↑" in table and f"{saved['rows'][1]['fid']:.2f}" in table
    assert "4 generated vs 6 reference images" in table


def test_a_metric_without_its_files_is_absent_with_a_note(tiny_sd):
    result = evaluate(tiny_sd, [], PROMPTS[:2], [0, 1], reference_steps=1, progress=False)
    row = result["rows"][0]
    assert row["fid"] is None and row["clip_score"] is None and math.isfinite(row["trajectory_error"])
    table = markdown_table(result)
    assert "| teacher-ddim | 1 | 7.5 | — | — | 0.0000 |" in table
    assert "FID not computed: give --fid-features" in table and "CLIP score not computed: give --clip" in table


@pytest.mark.parametrize("case, message", [
    ("no fid file", r"--fid-features .*missing\.pt: no such file; give a TorchScript .*inception-2015-12-05\.pt"),
    ("no reference folder", r"--reference-images .*nowhere: no such folder; give a folder of real"),
    ("empty reference folder", r"--reference-images .*empty: 0 images .*FID needs at least 2"),
    ("fid without references", r"--fid-features is given without --reference-images"),
    ("no clip folder", r"--clip .*no-clip: no such folder; give a folder saved with CLIPModel.save_pretrained"),
    ("clip folder without a processor", r"--clip .*half-clip: processor_config\.json \(or preprocessor_config\.json\) is missing"),
    ("not torchscript", r"--fid-features .*junk\.pt: not a TorchScript file \(torch.jit.load"),
])
def test_missing_or_wrong_metric_files_are_refused_before_generation(case, message, fid_net, clip_dir, tmp_path):
    reference = _write_images(tmp_path / "real", _random_images(2, 8, seed=5))
    (tmp_path / "empty").mkdir()
    (tmp_path / "half-clip").mkdir()
    (tmp_path / "half-clip" / "config.json").write_text("{}")
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    kwargs = {
        "no fid file": dict(fid_features=tmp_path / "missing.pt", reference_images=reference),
        "no reference folder": dict(fid_features=fid_net, reference_images=tmp_path / "nowhere"),
        "empty reference folder": dict(fid_features=fid_net, reference_images=tmp_path / "empty"),
        "fid without references": dict(fid_features=fid_net),
        "no clip folder": dict(clip=tmp_path / "no-clip"),
        "clip folder without a processor": dict(clip=tmp_path / "half-clip"),
        "not torchscript": dict(fid_features=tmp_path / "junk.pt", reference_images=reference),
    }[case]
    # A teacher that does not exist: the metric files are refused before the teacher is even loaded.
    teacher = tmp_path / "no-teacher" if case != "not torchscript" else None
    with pytest.raises(MetricFilesError, match=message):
        if teacher is not None:
            evaluate(teacher, [], PROMPTS[:1], [0], progress=False, **kwargs)
        else:  # a file that exists but is no network fails when loaded, still before any generation
            SdMetrics(**kwargs)


def test_the_digits_teacher_refuses_the_sd_metric_files(clip_dir):
    from rapm.evaluate import EvaluateError, default_digits_prompts

    with pytest.raises(EvaluateError, match="for SD/SDXL teachers; the digits teacher is measured with its own"):
        evaluate("digits", [], default_digits_prompts(1), [0], progress=False, clip=clip_dir)
