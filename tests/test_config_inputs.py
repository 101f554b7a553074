"""Issue 34, point 2: bad configs and prompts files. A string, NaN or inf where a number belongs, a negative or zero
size, 10^12 iterations, rank 10^6, an unknown key: one `error:` line naming the field, before anything is loaded or
written. A prompts file with NUL bytes, invalid UTF-8, CRLF ends, a 50 MB line, only blank lines: one error line, or
the documented behaviour (CRLF: the prompts without their \\r).
"""

import json

import pytest

from tests.cli_run import one_error as _one_error, run_main as _main


# --- configs ---------------------------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    ("lora_rank=many", ["'lora_rank' must be int", "'many'"]),
    ("lr=fast", ["'lr' must be float"]),
    ("lr=nan", ["'lr' must be a finite number"]),
    ("lr=inf", ["'lr' must be a finite number"]),
    ("disc_lr=-inf", ["'disc_lr' must be a finite number"]),
    ("huber_c=nan", ["'huber_c' must be a finite number"]),
    ("ema_decay=NaN", ["'ema_decay' must be a finite number"]),
    ("iterations=0", ["'iterations'", "at least 1"]),
    ("iterations=-5", ["'iterations'", "at least 1"]),
    ("batch_size=0", ["'batch_size'", "at least 1"]),
    ("lora_rank=-3", ["'lora_rank'", "at least 1"]),
    ("keep_checkpoints=0", ["'keep_checkpoints'", "at least 1"]),
    ("iterations=1000000000000", ["'iterations' must be at most 100,000,000"]),
    ("lora_rank=1000000", ["'lora_rank' must be at most 4,096"]),
    ("disc_lora_rank=1000000", ["'disc_lora_rank' must be at most 4,096"]),
    ("iterations=1e12", ["'iterations' must be int"]),
    ("lora_rnk=4", ["unknown field 'lora_rnk'"]),
]


@pytest.mark.parametrize("setting, words", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_a_bad_config_value_is_one_error_before_anything_is_written(setting, words, tiny_sd, sd_store, tmp_path):
    out = tmp_path / "run"
    code, err = _main(["train", "--teacher", tiny_sd, "--store", sd_store, "--out", out, "--no-progress", "--set", setting])
    _one_error(code, err, *words)
    assert not out.exists()


@pytest.mark.parametrize("text, words", [
    ('{"lr": NaN}', ["'lr' must be a finite number"]),  # Python's json reads NaN and Infinity
    ('{"lr": Infinity}', ["'lr' must be a finite number"]),
    ('{"iterations": 1000000000000}', ["'iterations' must be at most"]),
    ('{"lora_rank": "64"}', []),  # a number in a string is the number (as on the command line): no error
])
def test_a_config_file_with_nan_inf_or_huge_numbers(text, words, tiny_sd, sd_store, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(text)
    from rapm.config import ConfigError, TrainConfig, apply_overrides

    values = json.loads(text)
    if not words:
        assert apply_overrides(TrainConfig(), values, str(config)).lora_rank == 64
        return
    with pytest.raises(ConfigError) as raised:
        apply_overrides(TrainConfig(), values, str(config))
    assert str(config) in str(raised.value) and all(w in str(raised.value) for w in words)
    out = tmp_path / "run"
    code, err = _main(["train", "--teacher", tiny_sd, "--store", sd_store, "--out", out, "--config", config])
    _one_error(code, err, str(config), *words)
    assert not out.exists()


@pytest.mark.xfail(strict=True, reason="apply_overrides suggests a name only for '-' written for '_'; the nearest "
                                       "known name (difflib) needs a change outside validate/_coerce")
def test_an_unknown_key_is_refused_with_the_nearest_known_name():
    from rapm.config import ConfigError, TrainConfig, apply_overrides

    with pytest.raises(ConfigError, match=r"unknown field 'lora_rnk' \(did you mean 'lora_rank'\?\)"):
        apply_overrides(TrainConfig(), {"lora_rnk": 4}, "command line")


def test_a_hyphen_for_an_underscore_is_named():
    from rapm.config import ConfigError, TrainConfig, apply_overrides

    with pytest.raises(ConfigError, match=r"unknown field 'lora-rank' \(did you mean 'lora_rank'\?\)"):
        apply_overrides(TrainConfig(), {"lora-rank": 4}, "command line")


# --- prompts files ---------------------------------------------------------------------------------------------------------

BAD_PROMPTS = [
    ("nul", b"a photo of a cat\na\x00red car\n", ["prompt 2 holds a NUL byte", "UTF-8"]),
    ("utf16", "a photo of a cat\n".encode("utf-16-le"), ["NUL byte", "UTF-16"]),
    ("invalid-utf8", b"a photo of a cat\n\xff\xfe red car\n", ["not UTF-8 text"]),
    ("blank", b"\n   \r\n\t\n", ["no prompts"]),
    ("50mb-line", b"a cat " * (50 * 1024 * 1024 // 6) + b"\n",
     [f"prompt 1 is {6 * (50 * 1024 * 1024 // 6) - 1:,} characters long"]),  # stripped of its last space
]


@pytest.mark.parametrize("name, data, words", BAD_PROMPTS, ids=[n for n, _, _ in BAD_PROMPTS])
@pytest.mark.parametrize("verb", ["sample", "evaluate"])
def test_a_bad_prompts_file_is_one_error_before_the_teacher_loads(verb, name, data, words, tiny_sd, tmp_path,
                                                                    monkeypatch):
    import rapm.evaluate
    import rapm.sample

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(data)
    for verb_module in (rapm.sample, rapm.evaluate):  # where each verb looks load_teacher up
        monkeypatch.setattr(verb_module, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    out = tmp_path / ("samples" if verb == "sample" else "e.json")
    args = (["sample", "--teacher", tiny_sd, "--prompts", prompts, "--out", out] if verb == "sample" else
            ["evaluate", "--teacher", tiny_sd, "--prompts", prompts, "--num", "1", "--out", out])
    code, err = _main(args)
    _one_error(code, err, str(prompts), *words)
    assert not out.exists()


def test_crlf_prompts_are_read_without_their_carriage_returns(tiny_sd, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a photo of a cat\r\n\r\na red car\r\n")
    out = tmp_path / "samples"
    code, err = _main(["sample", "--teacher", tiny_sd, "--prompts", prompts, "--steps", "1", "--out", out])
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a photo of a cat", "a red car"]
