"""SD3-medium and FLUX.1-dev transformers built from their public configs on the meta device have the published sizes."""

from functools import lru_cache

import pytest

from benchmarks import flow_configs
from benchmarks.flow_configs import FLUX_DEV_PARAMS, SD3_MEDIUM_PARAMS, lora_parameter_count, parameter_count
from rapm.families.flow import FLUX_TARGET_MODULES, SD3_TARGET_MODULES

meta_transformer = lru_cache(maxsize=None)(flow_configs.meta_transformer)  # each is built once per session


@pytest.mark.parametrize("family, published", [("sd3", SD3_MEDIUM_PARAMS), ("flux", FLUX_DEV_PARAMS)])
def test_parameter_count_within_one_percent_of_published(family, published):
    model = meta_transformer(family)
    assert all(p.is_meta for p in model.parameters())  # no memory spent
    count = parameter_count(model)
    assert abs(count - published) / published < 0.01, count


def test_lora_parameter_count_of_the_default_targets():
    # rank-32 student on every target: a few percent of the transformer (measured: SD3 41.9M, FLUX 130.7M)
    sd3, flux = meta_transformer("sd3"), meta_transformer("flux")
    assert lora_parameter_count(sd3, SD3_TARGET_MODULES, 32) == 41_877_504
    # FLUX: the double blocks' twelve (89.7M) and the 38 single blocks' proj_mlp (3072 -> 12288) and proj_out
    # (15360 -> 3072); not the final proj_out (3072 -> 64), which a plain "proj_out" would also match
    single = 38 * 32 * ((3072 + 12288) + (15360 + 3072))
    assert lora_parameter_count(flux, FLUX_TARGET_MODULES, 32) == 89_653_248 + single == 130_744_320
