"""Models: TorchRec embedding tables, the Llama-style tower, the generative (pretraining)
and CTR models of GPSD, and the DeepFM / DIN baselines. No parallelism code lives here:
sharding is applied from outside (``recsys.distributed``)."""
