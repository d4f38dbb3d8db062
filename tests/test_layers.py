"""The layering of docs/architecture.md: each layer imports only the layers below it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# package -> layer (wire < dht, formats < moe, averaging < optim, tasks, integrations < services < cli)
LAYERS = {"wire": 1, "dht": 2, "formats": 2, "moe": 3, "averaging": 3, "optim": 4, "tasks": 4, "integrations": 4, "services": 5, "telemetry": 5, "monitor": 5,
          "cli": 6}

IMPORT_ALL = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(module.name)
print(json.dumps(sorted(name for name in sys.modules if name.startswith("apiary."))))
"""


@pytest.mark.parametrize("package", [name for name in LAYERS if LAYERS[name] < max(LAYERS.values())])
def test_a_layer_imports_no_module_of_a_higher_layer(package):
    """Every module of the layer, imported in a fresh interpreter, loads no module of a layer above it."""
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL, f"apiary.{package}"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    upward = [name for name in loaded if LAYERS.get(name.split(".")[1], 0) > LAYERS[package]]
    assert not upward, f"apiary.{package} (layer {LAYERS[package]}) imports {upward}"
