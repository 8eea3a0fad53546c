"""meft-convert: turn pretrained transformers checkpoints into exact-reversible MEFT models.

    from meft_convert import get_meft_model, MeftSettings

converts a model in memory (meft_convert/api.py); the `meft-convert` command converts a
checkpoint folder or hub id into a folder. Importing this package loads neither torch nor
transformers: get_meft_model does, when it is called.
"""

__version__ = "0.1.0"

# after __version__, which the modules below read
from .api import get_meft_model  # noqa: E402
from .settings import MeftSettings  # noqa: E402

__all__ = ["MeftSettings", "__version__", "get_meft_model"]
