"""transformers' logging and progress bars silenced while a model loads (conversion, calibration,
verification)."""

from __future__ import annotations

import contextlib

import transformers


@contextlib.contextmanager
def quiet_transformers():
    previous = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)
        if bars:
            transformers.utils.logging.enable_progress_bar()
