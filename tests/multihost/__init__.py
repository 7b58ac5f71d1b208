"""Tests across hosts: network namespaces on this machine, an agent per proxy and repository."""
