"""Training: metrics, optimizers and schedules, the loop every stage runs."""
