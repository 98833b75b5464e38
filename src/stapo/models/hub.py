"""Where a model named by hub id or local path loads from, decided within seconds when offline.

Without a network, transformers retries the hub for about a minute before it says so. Here one short
probe of the hub's endpoint decides first: reachable, the id is used as given; not (or with
``HF_HUB_OFFLINE=1``), the id's snapshot in the local Hugging Face cache, else one ``UserError``.
"""

from __future__ import annotations

import functools
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError

PROBE_TIMEOUT = 3.0  # seconds to connect to the hub's endpoint


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` or ``name``: not a path (``./x``, ``/x``, ``~/x``, ``a/b/c``)."""
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "\\" not in name


@functools.lru_cache(maxsize=4)
def hub_unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be reached (None: it answered, with any HTTP status). Proxies in the
    environment are honoured, as the hub client does."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_TIMEOUT).close()
    except urllib.error.HTTPError:
        return None  # an answer, even 4xx/5xx: the network is there
    except (urllib.error.URLError, OSError) as err:
        return str(getattr(err, "reason", err))
    return None


def resolve_model_source(name: str, key: str = "model.name_or_path") -> str:
    """``name`` as given (a local path, or a hub id with the hub reachable), else the id's cached
    snapshot folder; a hub id with neither network nor cache is a ``UserError`` naming ``key``."""
    if Path(name).expanduser().exists() or not looks_like_hub_id(name):
        return name
    from huggingface_hub import constants, snapshot_download

    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else hub_unreachable(constants.ENDPOINT)
    if reason is None:
        return name
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not in the cache
        raise UserError(
            f"{key}={name}: not a local folder nor in the Hugging Face cache, and the hub "
            f"({constants.ENDPOINT}) cannot be reached ({reason}); download it where there is a network "
            f"(`hf download {name}`) or give a local folder"
        ) from None
