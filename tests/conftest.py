"""Shared fixtures: tiny random SD and SDXL pipelines saved to disk and loaded back as a user would."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Tiny test models run fastest on one thread, and other work on the machine does not make threads spin.
torch.set_num_threads(1)
# oneDNN builds a kernel for each new conv shape (seconds per tiny model on this CPU); the plain kernels are fast here.
torch.backends.mkldnn.enabled = False


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from tests.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd", family="sd")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    from tests.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd_v", family="sd", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from tests.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sdxl", family="sdxl")


@pytest.fixture(scope="session")
def sd_store(tiny_sd, tmp_path_factory):
    from rapm.trajectories import write_trajectories

    folder = tmp_path_factory.mktemp("store")
    prompts = folder / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\na blue dog\na photo of a dog\n")
    write_trajectories(tiny_sd, prompts, folder / "store", steps=2, substeps=3, guidance=3.0, shard_size=2, progress=False)
    return folder / "store"


@pytest.fixture(scope="session")
def other_sd(tiny_sd, tmp_path_factory):
    """The tiny SD teacher with slightly different UNet weights: another teacher of the same shape."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("other") / "sd"
    shutil.copytree(tiny_sd, folder)
    weights = next((folder / "unet").glob("*.safetensors"))
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    return folder
