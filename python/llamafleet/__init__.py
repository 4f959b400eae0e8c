"""llamafleet: identical LLaMA-Factory training stacks on many nodes, and multi-node runs, with Ansible."""

from .api import NodeResult, StackResult, check, provision
from .errors import ConfigError, InventoryError, LlamafleetError, LockError
from .parity import ParityReport
from .serving import Server, ServeResult, serve, serve_status, serve_stop
from .training import ExportResult, NodeRun, RunStatus, TrainResult, collect, export, follow, status, stop, train

__all__ = ["provision", "check", "StackResult", "NodeResult", "ParityReport",
           "train", "follow", "status", "stop", "collect", "export", "TrainResult", "ExportResult",
           "serve", "serve_status", "serve_stop", "ServeResult", "Server", "RunStatus", "NodeRun",
           "LlamafleetError", "InventoryError", "LockError", "ConfigError"]
__version__ = "0.1.0"
