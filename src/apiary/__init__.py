"""apiary: train one large PyTorch model on many computers over the internet, with no master node."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("apiary")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = ["Optimizer", "__version__"]


def __getattr__(name: str) -> object:
    """`apiary.Optimizer`, imported on first use (it needs torch; `import apiary` does not): the
    collaborative optimizer, which starts embedded services when not given the participant's."""
    if name == "Optimizer":
        from apiary.services.embedded import Optimizer

        return Optimizer
    raise AttributeError(f"module 'apiary' has no attribute {name!r}")
