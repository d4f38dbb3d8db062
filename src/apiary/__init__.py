"""apiary: train one large PyTorch model on many computers over the internet, with no master node."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("apiary")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
