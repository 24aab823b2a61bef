"""URLs with their passwords masked, for anything that is logged, printed or tracked: a PostgreSQL storage
URL or a tracking server URL may carry credentials (`postgresql://user:secret@host/db`). Pure."""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def redact_url(url: str | None) -> str | None:
    """`scheme://user:***@host/...` for a URL with a password; anything else unchanged."""
    if not url or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        netloc = f"{user}:{MASK}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # not parseable: mask everything between '://' and '@'
        head, _, rest = url.partition("://")
        return f"{head}://{MASK}@{rest.rsplit('@', 1)[-1]}" if rest else MASK


def redact_text(text: str, url: str | None) -> str:
    """`text` (e.g. a driver's error message) with `url` and its password masked wherever they appear."""
    if not url:
        return text
    text = text.replace(url, redact_url(url))
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, MASK) if password else text
