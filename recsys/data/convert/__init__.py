"""Converters of public behaviour logs into recsys datasets (GPSD protocol)."""
