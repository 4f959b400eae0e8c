"""ansible-lint, production profile, nothing skipped: the playbooks, roles and collection as shipped."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]


def test_lint_config_skips_nothing():
    cfg = yaml.safe_load((PROJECT / ".ansible-lint").read_text())
    assert cfg["profile"] == "production"
    assert not cfg.get("skip_list") and not cfg.get("warn_list")


def test_ansible_lint_production_profile_passes():
    exe = Path(sys.executable).parent / "ansible-lint"
    assert exe.exists() or shutil.which("ansible-lint"), "ansible-lint is not installed (make setup installs it)"
    proc = subprocess.run([str(exe) if exe.exists() else "ansible-lint", "--nocolor"], cwd=PROJECT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr
