"""The click group: every usage error as one `Error: ...` line with exit code 2, a crash as its traceback with
any password masked."""

from __future__ import annotations

import sys

import click


class BadInput(click.ClickException):
    """A one-line usage error, exit code 2."""

    exit_code = 2


class OneLineErrors(click.Group):
    """Every usage error as a single `Error: ...` line (click's default adds usage lines)."""

    def main(self, args=None, prog_name=None, **kwargs):
        kwargs.pop("standalone_mode", None)
        try:
            rv = super().main(args, prog_name, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            from mnist_diff.util.redact import redact_text

            click.echo(f"Error: {redact_text(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except Exception:  # a crash: its traceback, less any password a library's error message quotes
            import traceback

            from mnist_diff.util.redact import redact_text

            click.echo(redact_text(traceback.format_exc()), err=True, nl=False)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)
