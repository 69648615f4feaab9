"""Upload a published folder to the Hugging Face Hub."""

from __future__ import annotations

import os
import re
from pathlib import Path

from services.errors import ForgeError
from services.library.imports import hub_offline_reason


class UploadError(ForgeError, RuntimeError):
    """Uploading to the Hugging Face Hub failed; the message says why and what to do."""


def upload(published_path: str | os.PathLike, repo_id: str, token: str | None = None, *, private: bool = True,
           timeout: float = 4.0) -> str:
    """Upload a published folder to the Hugging Face Hub (creating the repository); return its URL.

    Fails fast (within ``timeout`` seconds) with :class:`UploadError` when offline (``HF_HUB_OFFLINE``) or when
    the Hub cannot be reached.
    """
    path = Path(published_path)
    if not (path / "config.json").is_file() or not (path / "README.md").is_file():
        raise UploadError(f"{path} is not a published model folder (config.json and README.md expected)")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", repo_id or ""):
        raise UploadError(f"repo_id {repo_id!r}: expected OWNER/NAME (letters, digits, '.', '_', '-')")
    reason = hub_offline_reason(timeout)
    if reason:
        raise UploadError(f"{reason}: nothing can be uploaded; retry when online")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        api.upload_folder(folder_path=str(path), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload {path.name} from ForgeLLM")
    except HfHubHTTPError as e:
        raise UploadError(f"upload of {path} to {repo_id} failed: {e}") from e
    except (OSError, ValueError) as e:
        raise UploadError(f"upload of {path} to {repo_id} failed: {type(e).__name__}: {e}") from e
    return str(url)
