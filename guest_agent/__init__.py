"""cowork guest agent: the gRPC server that runs inside the sandbox VM."""

from cowork.defaults import AGENT_VERSION

__version__ = AGENT_VERSION
