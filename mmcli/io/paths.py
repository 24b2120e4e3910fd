"""Path checks shared by the commands that follow paths read from a report (merge, report)."""

from __future__ import annotations

import os
from pathlib import Path


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies strictly inside ``folder``, as written (resolve both first: :func:`resolves_inside`)."""
    return folder in path.parents


def resolves_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path``, links and ``..`` followed, lies strictly inside ``folder`` (links followed too).

    ``masks/../../x``, an absolute path elsewhere and a link that leads out are all outside.
    """
    return inside(Path(os.path.realpath(path)), Path(os.path.realpath(folder)))
