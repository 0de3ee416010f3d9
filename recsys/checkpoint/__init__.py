"""Checkpoints: DCP save/load of everything a run needs, transfer and freezing of tables."""
