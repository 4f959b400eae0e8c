"""The rules the controller shares with the nodes, loaded from the one file that holds them: the collection's
``module_utils/rules.py``, which Ansible bundles into the node-side modules. Import the names from here."""

from __future__ import annotations

import importlib.util
import sys

from .paths import PROJECT_DIR

_FILE = PROJECT_DIR / "collections" / "ansible_collections" / "llamafleet" / "cluster" / "plugins" / "module_utils" / "rules.py"
_NAME = "llamafleet._node_rules"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, _FILE)
    sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_NAME])
_rules = sys.modules[_NAME]

MARKER: str = _rules.MARKER
BASELINE: frozenset[str] = _rules.BASELINE
canon = _rules.canon
version_matches = _rules.version_matches
package_drift = _rules.package_drift
extras = _rules.extras
read_marker = _rules.read_marker
sha256_file = _rules.sha256_file
