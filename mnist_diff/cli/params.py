"""The CLI's parameter types: click's own, taking '' for "not given" (as MLproject passes it), and the
types that check a value against the package before any work starts (an MNIST root, Inception weights)."""

from __future__ import annotations

import re

import click


class BlankIsDefault:
    """Mixin for a click type: an empty value is None, "not given" (the option's default applies). MLproject
    passes every option unconditionally, and an empty string is how `mlflow run` says the user gave none."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            return None
        return super().convert(value, param, ctx)


# click's IntRange, FloatRange, Choice and Path, taking '' for "not given" as well
class OptionalInt(BlankIsDefault, click.IntRange):
    pass


class OptionalFloat(BlankIsDefault, click.FloatRange):
    pass


class OptionalChoice(BlankIsDefault, click.Choice):
    pass


class OptionalPath(BlankIsDefault, click.Path):
    pass


class MnistRoot(click.Path):
    """A torchvision root that holds MNIST (`data.check_mnist_root`): read, never downloaded into."""

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        from mnist_diff.runtime.data import check_mnist_root

        try:
            check_mnist_root(path)
        except ValueError as err:
            self.fail(str(err), param, ctx)
        return path


class InceptionWeights(click.Path):
    """torch-fidelity's Inception weights file (`evaluate.check_weights`), checked before any work."""

    def convert(self, value, param, ctx):
        path = super().convert(value, param, ctx)
        from mnist_diff.fid.engine import check_weights

        try:
            check_weights(path)
        except ValueError as err:
            self.fail(f"{path}: {err}", param, ctx)
        return path


class Workers(click.ParamType):
    """`auto` (one worker per visible GPU; 1 without a GPU) or a count >= 1; empty means auto."""

    name = "auto|N"

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        text = str(value).strip()
        if text in ("", "auto"):
            return "auto"
        if not text.isdigit() or int(text) < 1:
            self.fail(f"{value!r} is neither auto nor a count >= 1", param, ctx)
        return int(text)


class Duration(click.ParamType):
    """A time span: seconds (`600`), or numbers with units h, m/min, s (`25m`, `1h30m`, `1.5h`); empty: not
    given. Returns seconds."""

    name = "DURATION"
    UNITS = {"h": 3600, "m": 60, "min": 60, "s": 1, "": 1}

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, (int, float)):
            return value
        text = str(value).strip().lower().replace(" ", "")
        if not text:
            return None
        parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|s|)", text)
        if not parts or "".join(n + u for n, u in parts) != text or float(parts[0][0]) <= 0:
            self.fail(f"{value!r} is not a time span such as 600, 90s, 25m or 1h30m", param, ctx)
        return sum(float(n) * self.UNITS[u] for n, u in parts)


class CountList(click.ParamType):
    """Counts >= 1 as a comma list (`1,2,4`): a tuple of distinct counts, ascending."""

    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",")]
        if not all(item.isdigit() and int(item) >= 1 for item in items):
            self.fail(f"{value!r} is not a comma list of counts >= 1, such as 1,2,4", param, ctx)
        return tuple(sorted({int(item) for item in items}))


class ChoiceList(click.ParamType):
    """Some of `choices` as a comma list in one value (`linear,cosine`), or `all`: as a tuple, in the order of
    `choices`, so the same selection always makes the same grid."""

    name = "list"

    def __init__(self, choices):
        self.choices = tuple(choices)

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",")]
        if "all" in items:
            return self.choices
        for item in items:
            if item not in self.choices:
                self.fail(f"{item!r} is not one of {', '.join(map(repr, self.choices))} or 'all'", param, ctx)
        return tuple(c for c in self.choices if c in items)


def selected(values: tuple, choices: tuple) -> tuple:
    """The union of a repeatable ChoiceList option's values, in the order of `choices`."""
    return tuple(c for c in choices if any(c in v for v in values))
