"""mmcli: MultiMix joint pneumonia classification and lung segmentation for chest radiographs.

The command line is ``mmcli``; in Python, :func:`load` gives a model that predicts one
image at a time (see :mod:`mmcli.api`)::

    import mmcli
    result = mmcli.load().predict("scan.png")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0.dev0"

__all__ = ["Model", "Result", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # The API pulls in torch: imported on first use, so that `import mmcli` (and the CLI's
    # start-up) stays light.
    if name in ("Model", "Result", "load"):
        from mmcli import api

        return getattr(api, name)
    raise AttributeError(f"module 'mmcli' has no attribute {name!r}")
