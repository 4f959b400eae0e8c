"""Build step that makes the wheel self-contained: the Ansible side of llamafleet (ansible.cfg, playbooks,
roles, the collection, templates, the sample inventory) is copied into ``llamafleet/share`` of the built
package, so an installed llamafleet runs from any directory. A checkout (editable install) reads the same
files in place; python/llamafleet/paths.py finds whichever is there. Everything else is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# what the CLI and the library read at run time (kept in step with MANIFEST.in, which puts it in the sdist)
SHARED = ("ansible.cfg", "playbooks", "roles", "collections", "templates", "inventory/sample",
          "provision.yml", "check.yml", "train.yml", "status.yml", "stop.yml", "collect.yml", "export.yml", "serve.yml")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".llamafleet")


class BuildWithShare(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout itself
        share = Path(self.build_lib) / "llamafleet" / "share"
        shutil.rmtree(share, ignore_errors=True)
        for name in SHARED:
            src, dst = ROOT / name, share / name
            if src.is_dir():
                shutil.copytree(src, dst, ignore=IGNORE)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildWithShare})
