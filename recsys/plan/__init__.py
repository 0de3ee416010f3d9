"""Sharding plans made offline for a cluster: hosts, the planner, plan files, views."""
