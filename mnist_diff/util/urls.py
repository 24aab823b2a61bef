"""Store URLs: an in-memory SQLite database (`sqlite://`, `sqlite:///:memory:`) loses what is written to it
when the command ends, so no store of ours may be one."""

from __future__ import annotations

import re


def in_memory_sqlite(url: str | None) -> bool:
    return bool(
        url
        and re.match(r"sqlite(\+\w+)?://", url)
        and (re.fullmatch(r"sqlite(\+\w+)?:///?", url) or ":memory:" in url or "mode=memory" in url)
    )


def in_memory_reason(url: str, flag: str) -> str:
    return f"{flag} {url} is an in-memory database, lost when the command ends; give a file (e.g. sqlite:///mlflow.db)"
