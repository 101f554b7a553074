"""Words in rapm's messages: a count with its noun in the right number ("1 grid", "2 grids"); the libraries' bars off."""

from __future__ import annotations


def plural(count: int, noun: str, many: str | None = None) -> str:
    """``count`` and ``noun``, the noun in the plural (``many``, else ``noun + "s"``) unless ``count`` is 1."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"


def quiet_library_bars() -> None:
    """Silence the progress bars that transformers ("Loading weights"), diffusers ("Loading pipeline components")
    and huggingface_hub print while rapm loads a teacher: every verb's ``--no-progress`` silences theirs too."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    disable_progress_bars()
