"""Where mnist-diff keeps what it downloads or measures once: `$XDG_CACHE_HOME/mnist-diff` (`~/.cache/...`)."""

import os
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mnist-diff"
