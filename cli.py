#!/usr/bin/env python
"""mnist-diff's command line, as MLproject calls it (`python cli.py sweep ...`); after `pip install`, the same
commands are `mnist-diff sweep ...`. The commands live in `mnist_diff/cli/`."""

from mnist_diff.cli import cli

if __name__ == "__main__":
    cli()
