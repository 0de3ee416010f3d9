"""Serving a finetuned CTR model without recsys: the exported artifact (``recsys export``).

- :mod:`recsys.serve.quantize`: an embedding table stored as fp32, fp16 or row-wise int8,
  dequantized inside the graph;
- :mod:`recsys.serve.inference`: the CTR forward on dense padded ids, in plain torch;
- :mod:`recsys.serve.export`: a finished finetune stage → the artifact directory;
- :mod:`recsys.serve.score`: the artifact's own ``score.py`` (torch, pyarrow, numpy only).
"""
