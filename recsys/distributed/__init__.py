"""Process groups, multi-rank launching and TorchRec sharding plans."""
