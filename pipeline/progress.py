"""Progress bars on stderr, shared by the commands that write datasets (prepare, synth)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(label: str, total: int, show: bool | None = None) -> tqdm:
    """A bar over ``total`` images on stderr, closed by ``with``; ``update()`` once per image.

    ``show=None`` (the commands' default) draws it only when stderr is a terminal, so logs and
    captured output get no redrawn lines (the command's summary line gives the counts there);
    ``True`` draws it anyway (``--progress``), ``False`` never (``--no-progress``)."""
    return tqdm(
        total=total,
        desc=label,
        unit="img",
        file=sys.stderr,
        disable=None if show is None else not show,
        dynamic_ncols=True,
    )
