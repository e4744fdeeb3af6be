"""The Hugging Face hub in one place: where it is, whether we may use it, whether it answers, and its errors as one
clear paragraph. Every hub id the pipeline accepts goes through here: tokenizer.pretrained, data sources and SFT
data of type hf, sft.base_model, and 05_check / 06_install of a hub id.

    reason = offline_reason()                        # "HF_HUB_OFFLINE is set" or None
    require_reachable("sft.base_model: 'a/b':", "use a local model folder")   # a TCP probe: seconds, not minutes
    info = hub_call(lambda: api.model_info("a/b"), "a/b")                     # errors -> UserError

HF_ENDPOINT is read at call time (a mirror, or a test's fake hub), never cached at import.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from lib.config import CheckConfig
from lib.errors import UserError

DEFAULT_ENDPOINT = "https://huggingface.co"
TRUE = ("1", "ON", "YES", "TRUE")
T = TypeVar("T")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


def offline_reason(datasets: bool = False) -> str | None:
    """Why the hub may not be used ("HF_HUB_OFFLINE is set"), or None. `datasets`: also HF_DATASETS_OFFLINE."""
    names = ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"] + (["HF_DATASETS_OFFLINE"] if datasets else [])
    values = {n: os.environ[n].strip().upper() for n in names if os.environ.get(n, "").strip()}
    for name, value in values.items():
        if value in TRUE:
            return f"{name} is set"
    if values:  # set, and to "0": the environment says online, whatever huggingface_hub read at import
        return None
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None


def hub_token(cfg: CheckConfig) -> str | None:
    """HF_TOKEN from the environment, else the token file named in the config, else None (the hub's saved login)."""
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"].strip()
    if cfg.hf_token_file:
        p = Path(cfg.hf_token_file).expanduser()
        if not p.is_file():
            raise UserError(f"check.hf_token_file: {p} does not exist (expected a file holding a hub access token)")
        return p.read_text(encoding="utf-8").strip() or None
    return None


def is_network_error(e: BaseException) -> bool:
    """A failure to talk to the host at all (DNS, refused, TLS, timeout), whichever HTTP library raised it."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"ConnectError", "TimeoutException", "TransportError", "NetworkError", "ConnectionError",
                         "TimeoutError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError"})


def require_reachable(where: str, hint: str, timeout: float = 5.0) -> None:
    """One TCP connection to the endpoint: the hub's own clients retry an unreachable host for minutes."""
    url = urlparse(endpoint())
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"{where} the hub at {host}:{port} is not reachable ({e}); {hint}") from None


def hub_call(fn: Callable[[], T], subject: str) -> T:
    """Run one hub request; turn the hub client's errors into one paragraph that starts with `subject`."""
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = endpoint()
    try:
        return fn()
    except GatedRepoError:
        raise UserError(f"{subject}: gated model: accept its licence on {where} with your account, then set HF_TOKEN "
                        "to an access token of that account (or check.hf_token_file)") from None
    except RepositoryNotFoundError:
        raise UserError(f"{subject}: not found on {where}, or private: check the spelling; for a private model set "
                        "HF_TOKEN to an access token that can read it (or check.hf_token_file)") from None
    except RevisionNotFoundError:
        raise UserError(f"{subject}: revision not found (check.revision)") from None
    except DisabledRepoError:
        raise UserError(f"{subject}: this repository has been disabled on the hub") from None
    except OfflineModeIsEnabled:
        raise UserError(f"{subject}: the hub is in offline mode (HF_HUB_OFFLINE=1): unset it to use a hub id, or "
                        "use a local copy instead") from None
    except HfHubHTTPError as e:
        raise UserError(f"{subject}: the hub answered with an error ({str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001 - network errors come from the hub's HTTP library, whichever it is
        if is_network_error(e):
            raise UserError(f"{subject}: cannot reach the Hugging Face hub at {where} ({type(e).__name__}: {e}). "
                            "This needs network access; offline, use a local model directory or .gguf file") from None
        raise
