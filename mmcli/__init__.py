"""mmcli: MultiMix joint pneumonia classification and lung segmentation for chest radiographs."""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
