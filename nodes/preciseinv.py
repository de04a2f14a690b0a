"""Nodes for this method: filled in by its issue."""
NODES = []
