"""recsys: generative pretraining for Transformer rankers on TorchRec (GPSD, KDD'25).

The package owns the library: data streaming, models, sharding and planning, the training
loop, checkpoints, transfer/freeze, the stage chaining (``recsys.pipelines``) and the
``recsys`` command. TorchX component files live in ``components/``, outside this package.
"""

__version__ = "0.1.0"
