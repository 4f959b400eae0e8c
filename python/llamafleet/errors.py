"""Errors that carry a message meant for a person: what is wrong, where, and the fix."""

from __future__ import annotations


class LlamafleetError(Exception):
    """Base of every user-facing error. The CLI prints ``str(err)`` and exits non-zero, never a traceback."""

    exit_code = 2

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class InventoryError(LlamafleetError):
    """The inventory describes no valid cluster."""


class LockError(LlamafleetError):
    """The stack lock file is missing, malformed or asks for something impossible."""


class ConfigError(LlamafleetError):
    """A training configuration (LLaMA-Factory yaml, dataset_info.json, DeepSpeed json) is wrong."""

