"""Finding a model (a local folder or a hub id through the Hugging Face cache) and publishing one."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import BadInputError, MeftConvertError

# everything a conversion reads; other files of a repository (other frameworks' weights,
# ONNX exports) are never downloaded
NEEDED_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "generation_config.json",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.model",
    "chat_template.jinja",
]


def _looks_like_path(model: str) -> bool:
    # hub ids are "name" or "org/name"; anything else is meant as a folder
    return model.startswith((".", "/", "~")) or model.endswith("/") or model.count("/") > 1 or "\\" in model


def resolve_model(model: str, revision: str | None = None) -> Path:
    """The folder holding `model`: itself if it is a local folder, else its snapshot in the
    Hugging Face cache (downloaded unless HF_HUB_OFFLINE=1)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise BadInputError(f"--revision applies to hub ids, but {model} is a local folder")
        return path.absolute()
    if path.exists():
        raise BadInputError(f"{model} is a file; give the folder that holds config.json and the weights")
    if _looks_like_path(model):
        raise BadInputError(f"no such folder: {model}")
    try:
        # offline, read the cache only (older huggingface_hub releases still ask the server
        # to list a pinned revision's files otherwise)
        return Path(
            snapshot_download(model, revision=revision, allow_patterns=NEEDED_FILES, local_files_only=constants.HF_HUB_OFFLINE)
        )
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise BadInputError(f"model {model!r} not found or not accessible on the hub ({type(e).__name__})") from None
    except RevisionNotFoundError:
        raise BadInputError(f"model {model!r} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        where = "in the Hugging Face cache (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else "locally or on the hub"
        raise BadInputError(f"model {model!r}{'' if revision is None else f' at revision {revision!r}'} not found {where}") from None
    except HFValidationError:
        raise BadInputError(f"{model!r} is neither a local folder nor a valid hub model id") from None
    except HfHubHTTPError as e:
        raise MeftConvertError(f"could not download {model!r}: {e}") from None


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Uploads a converted folder to a model repository (created if needed); returns its URL."""
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message="Upload MEFT checkpoint converted with meft-convert",
        )
    except HfHubHTTPError as e:
        raise MeftConvertError(f"pushing to {repo_id!r} failed: {e}") from None
    return str(url)
