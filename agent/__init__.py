"""node-agent: the daemon that does, on one node, what the cloud's controller asks."""

__version__ = "0.1.0"
