"""Finding a model (a local folder or a hub id through the Hugging Face cache) and publishing one."""

from __future__ import annotations

import shlex
from pathlib import Path

from .errors import BadInputError, HubAccessError, MeftConvertError

# huggingface_hub (a few tenths of a second to import) loads inside the functions that reach the
# hub: converting a local folder never does

# everything a conversion reads; other files of a repository (other frameworks' weights,
# pickle weights, ONNX exports) are never downloaded
NEEDED_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "generation_config.json",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.model",
    "chat_template.jinja",
    "README.md",  # the model card: its license goes into the converted model's card
]
DEFAULT_COMMIT_MESSAGE = "Upload MEFT checkpoint converted with meft-convert"


class PushError(MeftConvertError):
    """An upload failed; the local checkpoint is complete and `retry` uploads it again."""

    def __init__(self, message: str, retry: str):
        super().__init__(f"{message}\nThe local checkpoint is complete and unchanged. To retry only the upload:\n  {retry}")
        self.retry = retry


def _looks_like_path(model: str) -> bool:
    # hub ids are "name" or "org/name"; anything else is meant as a folder
    return model.startswith((".", "/", "~")) or model.endswith("/") or model.count("/") > 1 or "\\" in model


def resolve_model(
    model: str, revision: str | None = None, *, patterns: list[str] | None = NEEDED_FILES, token: str | None = None
) -> Path:
    """The folder holding `model`: itself if it is a local folder, else its snapshot in the
    Hugging Face cache (downloaded unless HF_HUB_OFFLINE=1). `patterns` selects the files to
    download (None: all of them)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise BadInputError(f"--revision applies to hub ids, but {model} is a local folder")
        return path.absolute()
    if path.exists():
        raise BadInputError(f"{model} is a file; give the folder that holds config.json and the weights")
    if _looks_like_path(model):
        raise BadInputError(f"no such folder: {model}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        # offline, read the cache only (older huggingface_hub releases still ask the server
        # to list a pinned revision's files otherwise)
        return Path(
            snapshot_download(
                model, revision=revision, allow_patterns=patterns, token=token, local_files_only=constants.HF_HUB_OFFLINE
            )
        )
    except GatedRepoError as e:  # before RepositoryNotFoundError, its base class
        raise HubAccessError(
            f"model {model!r} is gated: accept its conditions at {constants.ENDPOINT}/{model} and use a token of that "
            f"account (--token, HF_TOKEN or the stored login) ({_status(e)})"
        ) from None
    except RepositoryNotFoundError as e:
        raise BadInputError(
            f"model {model!r} not found on the hub ({constants.ENDPOINT}, {_status(e)}); if it is private, use a "
            "token that can read it (--token, HF_TOKEN or the stored login)"
        ) from None
    except RevisionNotFoundError:
        raise BadInputError(f"model {model!r} has no revision {revision!r}") from None
    except HFValidationError:
        raise BadInputError(f"{model!r} is neither a local folder nor a valid hub model id") from None
    except Exception as e:  # noqa: BLE001 (sorted below into not found, network and refused access)
        raise _download_failure(e, model, revision, token) from None


def _status(error: Exception) -> str:
    response = getattr(error, "response", None)
    return f"HTTP {response.status_code}" if response is not None else type(error).__name__


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _is_network_error(error: BaseException) -> bool:
    # httpx (and the httpx2 fork huggingface_hub uses) name their transport errors so; the
    # standard library's are OSErrors
    from huggingface_hub.errors import OfflineModeIsEnabled

    names = {c.__name__ for c in type(error).__mro__}
    if isinstance(error, OfflineModeIsEnabled):
        return False
    return bool(names & {"TransportError", "NetworkError", "TimeoutException"}) or isinstance(
        error, (ConnectionError, TimeoutError)
    )


def _download_failure(error: Exception, model: str, revision: str | None, token: str | None) -> MeftConvertError:
    """Why a hub model could not be had, as the error to raise: not in the cache or not on the
    hub (bad input, exit 2), or the hub unreachable or refusing the token (exit 1)."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    at = "" if revision is None else f" at revision {revision!r}"
    if constants.HF_HUB_OFFLINE:
        return BadInputError(f"model {model!r}{at} not found in the Hugging Face cache (HF_HUB_OFFLINE is set)")
    for cause in _causes(error):
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            server = _scrub(cause.server_message or cause.response.reason_phrase or "", token)
            if status == 401:
                has_token = bool(token or get_token())
                what = "the hub refused the token" if has_token else "the hub asks for a token and none was found"
                return HubAccessError(
                    f"could not download {model!r}: {what} (401 Unauthorized: {server}); check --token, HF_TOKEN or the stored login"
                )
            if status == 403:
                return HubAccessError(
                    f"could not download {model!r}: this token may not read it (403 Forbidden: {server}); use a token with access to it"
                )
            if status == 404:
                return BadInputError(f"model {model!r}{at} not found on the hub ({constants.ENDPOINT}, 404)")
            return HubAccessError(f"could not download {model!r}: the hub answered {status} ({server}); try again later")
        if _is_network_error(cause):
            return HubAccessError(
                f"could not reach {constants.ENDPOINT} to download {model!r}, and it is not in the Hugging Face cache "
                f"({type(cause).__name__}: {_scrub(str(cause), token)}); check the network connection, or convert a "
                "local folder"
            )
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return BadInputError(f"model {model!r}{at} not found locally or on the hub")
    return MeftConvertError(f"could not download {model!r}: {type(error).__name__}: {_scrub(str(error), token)}")


def retry_command(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """The command that uploads `folder` again (never with the token: it comes from the environment)."""
    words = ["meft-convert", "push", str(folder), repo_id]
    if private:
        words.append("--private")
    if revision is not None:
        words += ["--revision", revision]
    return shlex.join(words)


def _scrub(text: str, token: str | None) -> str:
    """Error texts are shown to the user: never with the token in them."""
    from huggingface_hub import get_token

    for secret in {token, get_token()} - {None, ""}:
        text = text.replace(secret, "***")
    return text


def _why(error: Exception, repo_id: str, has_token: bool) -> str:
    """The cause of a failed upload, in the user's terms."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        server = error.server_message or error.response.reason_phrase
        if status == 401:
            if not has_token:
                return "no Hugging Face token found: set HF_TOKEN, log in, or pass --token (401 Unauthorized)"
            return f"the hub refused the token (401 Unauthorized: {server}); check HF_TOKEN, the stored login or --token"
        if isinstance(error, RepositoryNotFoundError):
            return (
                f"{repo_id} exists but this token cannot see or write to it (a private repository of another "
                f"account?); choose another name or use a token with access to it ({status}: {server})"
            )
        if status == 403:
            return f"this token may not write to {repo_id} (403 Forbidden: {server}); it needs write access"
        if status == 409:
            return f"{repo_id} conflicts with an existing repository or branch (409 Conflict: {server})"
        return f"the hub answered {status}: {server}"
    name = type(error).__name__
    if "Connect" in name or "Timeout" in name or isinstance(error, OSError):
        return f"could not reach {constants.ENDPOINT} ({name}: {error})"
    return f"{name}: {error}"


def push_to_hub(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Uploads a converted folder to a model repository (created if needed) and returns the
    commit's URL. `revision` is a branch, created from main if it does not exist. The token is
    `token`, else HF_TOKEN, else the stored login. Raises PushError, which names the cause and
    the command that retries the upload; `folder` is only read."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HFValidationError

    folder = Path(folder)
    api = HfApi(token=token)
    retry = retry_command(folder, repo_id, private=private, revision=revision)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # huggingface_hub shows its own progress while it uploads
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        )
    except KeyboardInterrupt:
        raise PushError(f"pushing to {repo_id!r} was interrupted", retry) from None
    except HFValidationError as e:
        raise BadInputError(f"{repo_id!r} is not a valid hub repository id ({e})") from None
    except Exception as e:  # noqa: BLE001 (whatever broke the upload, the folder is intact: say so and how to retry)
        has_token = bool(token or get_token())
        raise PushError(f"pushing to {repo_id!r} failed: {_scrub(_why(e, repo_id, has_token), token)}", retry) from None
    return str(commit.commit_url)
