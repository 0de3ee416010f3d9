"""Datasets: Parquet schemas, streaming into TorchRec batches, converters and generators."""
