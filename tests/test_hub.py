"""Resolving models and publishing results."""

from __future__ import annotations

import pytest

from meft_convert import hub
from meft_convert.errors import BadInputError, MeftConvertError


def test_local_folder_resolves_to_itself(tiny_checkpoints):
    assert hub.resolve_model(str(tiny_checkpoints["bert"])) == tiny_checkpoints["bert"]


def test_revision_is_for_hub_ids_only(tiny_checkpoints):
    with pytest.raises(BadInputError, match="--revision applies to hub ids"):
        hub.resolve_model(str(tiny_checkpoints["bert"]), revision="main")


def test_a_file_is_not_a_model(tiny_checkpoints):
    with pytest.raises(BadInputError, match="is a file"):
        hub.resolve_model(str(tiny_checkpoints["bert"] / "config.json"))


@pytest.mark.parametrize("name", ["not a valid id!", "a/b/c/"])
def test_invalid_ids(name):
    with pytest.raises(BadInputError):
        hub.resolve_model(name)


class RecordingApi:
    """Stands in for the Hub's HTTP API (no network here); records what would be sent."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        RecordingApi.calls.append(("upload_folder", kwargs))


def test_push_creates_the_repository_and_uploads_the_folder(monkeypatch, tmp_path):
    RecordingApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    url = hub.push_to_hub(tmp_path, "me/opt-meft3", private=True)
    assert url == "https://huggingface.co/me/opt-meft3"
    assert RecordingApi.calls[0] == ("create_repo", "me/opt-meft3", {"private": True, "exist_ok": True})
    assert RecordingApi.calls[1][1]["folder_path"] == str(tmp_path) and RecordingApi.calls[1][1]["repo_id"] == "me/opt-meft3"


def test_push_failure_is_a_conversion_error(monkeypatch, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    class Unauthorized(HfHubHTTPError):
        def __init__(self):  # the real one wants an HTTP response object of its client library
            Exception.__init__(self, "401 Unauthorized")

    class Failing(RecordingApi):
        def create_repo(self, repo_id, **kwargs):
            raise Unauthorized()

    monkeypatch.setattr(hub, "HfApi", Failing)
    with pytest.raises(MeftConvertError, match="pushing to 'me/x' failed"):
        hub.push_to_hub(tmp_path, "me/x")
