"""The Hugging Face Hub side of pretrained folders: download a snapshot, upload a folder, fail fast offline.

``huggingface_hub`` is optional (``pip install 'densemtl[hub]'``) and imported only here, only when a Hub id is
used. Before any request the Hub (or the HTTPS proxy) is probed with one TCP connection of at most
:data:`PROBE_SECONDS`, in a thread so that a hanging DNS lookup cannot stall it: offline, a Hub id then fails in
seconds with the local-folder alternative, instead of waiting on ``huggingface_hub``'s retries and timeouts.
A snapshot already in the local cache still loads offline.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path
from types import ModuleType
from urllib.parse import urlparse

PROBE_SECONDS = 3.0  # the longest an unreachable Hub delays an error
ETAG_SECONDS = 5.0  # huggingface_hub's per-request metadata timeout once the Hub answered the probe
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = {"1", "true", "yes", "on"}


class HubUnavailableError(ConnectionError):
    """The Hub cannot be used from here (offline, unreachable, not installed); the message says what to do."""


def looks_like_repo_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hub model id ``org/name`` (one slash, no path parts)."""
    return bool(_REPO_ID.match(text)) and ".." not in text


def _require_hub(what: str) -> ModuleType:
    try:
        import huggingface_hub
    except ImportError as e:
        raise HubUnavailableError(
            f"{what} needs the huggingface_hub package: pip install 'densemtl[hub]' (or huggingface_hub), "
            "or use a local pretrained folder"
        ) from e
    return huggingface_hub


def _probe_target() -> tuple[str, int]:
    """(host, port) a connection to the Hub opens first: the HTTPS proxy when one is set, else the endpoint."""
    from huggingface_hub import constants

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(var):
            url = urlparse(os.environ[var] if "://" in os.environ[var] else f"http://{os.environ[var]}")
            return url.hostname or "", url.port or 8080
    url = urlparse(constants.ENDPOINT)
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def _reachable(host: str, port: int, timeout: float = PROBE_SECONDS) -> bool:
    """True when a TCP connection to ``host:port`` opens within ``timeout`` s, DNS lookup included."""
    opened: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                opened.append(True)
        except Exception:  # noqa: BLE001 (OSError, or anything a patched socket raises: never a thread traceback)
            opened.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # a stuck getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return bool(opened and opened[0])


def offline_reason() -> str | None:
    """Why the Hub cannot be used now (``HF_HUB_OFFLINE`` set, or no connection), or None when it can."""
    _require_hub("the Hugging Face Hub")
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host, port = _probe_target()
    if not _reachable(host, port):
        return f"{host}:{port} cannot be reached (no network, or a firewall; waited at most {PROBE_SECONDS:g} s)"
    return None


def download(
    repo_id: str, files: list[str], revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """The local folder of ``repo_id``'s snapshot holding ``files`` (downloaded, or the cached one offline).

    Raises:
        HubUnavailableError: offline without a cached copy, or the Hub failed; names the local-folder fix.
        FileNotFoundError: the repository or revision does not exist (or is private/gated without a token).
    """
    hub = _require_hub(f"loading {repo_id} from the Hub")
    from huggingface_hub import errors

    from densemtl import __version__

    kwargs = dict(
        revision=revision, cache_dir=cache_dir, allow_patterns=files, library_name="densemtl",
        library_version=__version__,
    )  # fmt: skip
    fix = (
        f"download it on a machine with internet with `hf download {repo_id} --local-dir DIR` "
        "(`huggingface-cli download` in huggingface_hub < 1.0) and pass DIR, the local folder, instead"
    )
    reason = offline_reason()
    try:
        if reason is not None:  # a snapshot cached earlier still works offline
            return Path(hub.snapshot_download(repo_id, local_files_only=True, **kwargs))
        return Path(hub.snapshot_download(repo_id, etag_timeout=ETAG_SECONDS, **kwargs))
    except errors.RepositoryNotFoundError as e:  # GatedRepoError too
        raise FileNotFoundError(
            f"Hub model {repo_id} does not exist or is private/gated: check the id, or log in "
            "(`hf auth login`, or HF_TOKEN) with an account that can read it"
        ) from e
    except errors.RevisionNotFoundError as e:
        raise FileNotFoundError(f"Hub model {repo_id} has no revision {revision!r}: check --revision") from e
    except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError) as e:
        cause = reason or f"the Hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        where = "" if reason is None else ", and no copy of it is in the local Hugging Face cache"
        raise HubUnavailableError(
            f"{repo_id} is not a local folder and cannot be downloaded: {cause}{where}; {fix}"
        ) from e


def ensure_online(repo_id: str, folder: str | Path) -> None:
    """Raise :class:`HubUnavailableError` within :data:`PROBE_SECONDS` when ``folder`` cannot be pushed now."""
    reason = offline_reason()
    if reason is not None:
        raise HubUnavailableError(
            f"cannot push {folder} to {repo_id}: {reason}; copy the folder (densemtl save-pretrained) to a "
            f"machine with internet and run `densemtl push-to-hub --pretrained DIR --repo {repo_id}` there"
        )


def upload(
    folder: Path,
    repo_id: str,
    files: list[str],
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create ``repo_id`` (a model repository; kept if it exists) and upload ``files`` of ``folder``.

    Returns the commit URL. Call :func:`ensure_online` first: that is what fails fast offline.
    """
    hub = _require_hub(f"pushing to {repo_id}")
    from huggingface_hub import errors

    api = hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", allow_patterns=files,
            commit_message=commit_message or f"Upload densemtl model from {folder.name}",
        )  # fmt: skip
    except errors.LocalTokenNotFoundError as e:
        raise HubUnavailableError(
            f"cannot push to {repo_id}: not logged in; run `hf auth login`, set HF_TOKEN or pass token="
        ) from e
    except errors.HfHubHTTPError as e:
        raise HubUnavailableError(
            f"cannot push to {repo_id}: the Hub refused ({str(e).splitlines()[0]}); check that your token "
            "has write access to that namespace"
        ) from e
    return str(getattr(info, "commit_url", info))
