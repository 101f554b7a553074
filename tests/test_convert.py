"""Single-file teachers (issue 31, point 2): `rapm convert model.safetensors --out folder --config same-model/` writes
the diffusers folder every verb takes, by diffusers' from_single_file with a local config (nothing downloaded), and
`--teacher model.safetensors` says exactly that command."""

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from rapm.cli import app
from rapm.convert import convert_single_file, single_file_kind
from rapm.errors import RapmError
from rapm.families.base import TeacherError
from rapm.teacher import load_teacher
from tests.ldm import save_single_file


@pytest.fixture(scope="module")
def single_file(tiny_sd, tmp_path_factory):
    return save_single_file(tiny_sd, tmp_path_factory.mktemp("single") / "my-model.safetensors")


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, (SystemExit, RapmError)):
        raise result.exception
    return result


def test_convert_gives_the_same_teacher_as_the_pipeline_it_came_from(tiny_sd, single_file, tmp_path):
    out = tmp_path / "converted"
    result = _invoke("convert", single_file, "--out", out, "--config", tiny_sd)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (SD 1.x, StableDiffusionPipeline); give it as --teacher {out}" in result.output
    ours, theirs = load_teacher(out, vae=True), load_teacher(tiny_sd, vae=True)
    assert ours.family == "sd" and ours.scheduler_config == theirs.scheduler_config
    for part in ("unet", "vae"):
        a, b = getattr(ours, part).state_dict(), getattr(theirs, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    cond, _ = ours.encode_prompts(["a photo of a cat"])
    torch.testing.assert_close(cond.prompt_embeds, theirs.encode_prompts(["a photo of a cat"])[0].prompt_embeds)
    assert not list(tmp_path.glob(".converted.converting-*"))  # the staging folder is gone


def test_a_single_file_teacher_is_refused_with_the_exact_command(single_file, tmp_path):
    with pytest.raises(TeacherError) as e:
        load_teacher(single_file)
    want = f"rapm convert {single_file} --out {single_file.with_name('my-model-diffusers')}"
    assert want in str(e.value) and "--config" in str(e.value)


def _fake(path, keys):
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    return path


@pytest.mark.parametrize("keys, kind", [
    (["conditioner.embedders.1.model.ln_final.weight", "conditioner.embedders.0.transformer.x",
      "model.diffusion_model.out.0.weight"], ("sdxl", "SDXL")),
    (["cond_stage_model.model.token_embedding.weight", "model.diffusion_model.out.0.weight"], ("sd", "SD 2.x")),
    (["cond_stage_model.transformer.text_model.x", "model.diffusion_model.out.0.weight"], ("sd", "SD 1.x")),
])
def test_the_family_is_told_from_the_tensor_names(keys, kind, tmp_path):
    assert single_file_kind(_fake(tmp_path / "m.safetensors", keys)) == kind


@pytest.mark.parametrize("keys, says", [
    (["model.diffusion_model.joint_blocks.0.x"], "a single file of SD3"),
    (["double_blocks.0.img_attn.qkv.weight"], "a single file of FLUX.1"),
    (["cond_stage_model.transformer.text_model.x"], "no UNet"),
    (["lora_unet_down_blocks_0.lora_down.weight"], "no SD 1.x / 2.x / SDXL checkpoint's tensors"),
])
def test_what_rapm_does_not_convert_is_one_error_naming_the_file(keys, says, tmp_path):
    path = _fake(tmp_path / "m.safetensors", keys)
    result = _invoke("convert", path, "--out", tmp_path / "out", "--config", tmp_path)
    assert result.exit_code != 0 and says in str(result.exception) and str(path) in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_bad_arguments_change_nothing(tiny_sd, single_file, tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"not opened")
    with pytest.raises(TeacherError, match="a pickle"):
        convert_single_file(tmp_path / "model.ckpt", tmp_path / "a")
    with pytest.raises(TeacherError, match="--config .*no model_index.json"):
        convert_single_file(single_file, tmp_path / "a", config=tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("mine")
    with pytest.raises(TeacherError, match="exists and is not an empty folder"):
        convert_single_file(single_file, tmp_path / "full", config=tiny_sd)
    assert (tmp_path / "full" / "thesis.tex").read_text() == "mine" and not (tmp_path / "a").exists()
