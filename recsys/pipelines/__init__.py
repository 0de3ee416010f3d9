"""Chaining the recsys stages as TorchX jobs on any scheduler, with profiles from torchx.yaml."""
