"""URLs with their passwords masked, for anything that is logged, printed or tracked: a PostgreSQL storage
URL or a tracking server URL may carry credentials (`postgresql://user:secret@host/db`). Pure."""

from __future__ import annotations

import logging
import re

MASK = "***"

# `user:password@` after a scheme-ish prefix, whether or not the rest parses as a URL (`postgresql:/u:pw@h`,
# `postgres:u:pw@h`): a mistyped URL is where a parser finds no password to mask. The password runs to the
# last '@' of the word, so an unescaped '@' in it leaks nothing either.
_CREDENTIALS = re.compile(r"""(?P<keep>\b[A-Za-z][\w+.-]*:/*[^\s'"/:@]*:)(?P<password>[^\s'"]*)@""")


def _password(url: str) -> str | None:
    match = _CREDENTIALS.search(url)
    return match["password"] if match and match["password"] else None


def redact_text(text: str | None, url: str | None = None) -> str | None:
    """`text` (a URL, a message, a log line) with every `user:password@` masked; and with `url`'s password
    wherever else it appears (e.g. quoted alone in a driver's error message)."""
    if not text:
        return text
    password = _password(url) if url else None
    if password:
        text = text.replace(password, MASK)
    return _CREDENTIALS.sub(lambda m: f"{m['keep']}{MASK}@", text)


def redact_url(url: str | None) -> str | None:
    """`scheme://user:***@host/...` for a URL with a password; anything else unchanged."""
    return redact_text(url)


class RedactingFormatter(logging.Formatter):
    """Log lines, tracebacks included, with every `user:password@` masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))
