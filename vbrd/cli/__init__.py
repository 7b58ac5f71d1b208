"""Command-line entry points: ``vbrd`` (daemon, agent, lab) and ``vbrctl``."""
