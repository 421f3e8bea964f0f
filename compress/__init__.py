"""Turn a PyTorch or ONNX model into a pruned, quantized, evaluated, signed artifact.

Imported as ``edgectl.compress``. The pipeline runs named stages over a recipe of passes:

- ``pipeline``: the stages (acquire, float passes, quantize passes, time and choose, target passes,
  package) and the Python API (``run``, ``compress_module``); it knows no pass by name.
- ``recipe``: the recipe, a dataclass with one optional typed config per pass, in run order.
- ``passes``: one pass per file (``cleanup``, ``prune``, ``quantize``, ``mixed_precision``,
  ``layout``, ``tensorrt``), each ``run(state, config, ctx) -> PassResult`` (``passes/base.py``);
  ``export``, ``smooth``, ``stem`` and ``channels_last`` are the torch exporter, SmoothQuant, the
  image-stem rewrites (padded to 4 channels or kept float) and the NHWC rewrite of int8 graphs the
  stages and passes call; ``quant_modes`` is what the quantize pass may try on a target (its
  config, the modes a profile runs, each mode's first candidates); ``pace`` races a candidate against
  the model it must beat before its costly full evaluation; ``residual`` keeps a transformer's
  residual Add + LayerNormalization out of ORT's slower SkipLayerNormalization.
- ``source``: where the float model comes from (ONNX file, ``.pt2``, factory, ``nn.Module``).
- ``data``: calibration and evaluation ``.npz`` files, checked against the model's inputs.
- ``user_code``: the user's ``module:function`` (a factory, a metric), imported as ``python -m`` finds it.
- ``metrics``: the quality metrics ``--metric`` names (top-1, cosine, masked cosine, a user's function).
- ``clock``: wall and CPU seconds per stage of one run (the report's time breakdown).
- ``evaluate``: the evaluator every model goes through, the quality gate, interleaved latency.
- ``choice``: which timed model ships (the fastest passing one), the providers timing runs on, and the
  refusal when no candidate passed.
- ``quantizer``: one quantized model with ORT's quantizer; the modes; nodes kept float by rule.
- ``perchannel``: 8-bit per-channel weights in one array operation, bit-identical to ORT's loop.
- ``sensitivity``: per-node quantization error, the ranking mixed precision keeps float from.
- ``channel_groups``: which channels structured pruning must remove together.
- ``recover``: pruning a torch model with Torch-Pruning and distilling it back (``--train``).
- ``lift``: a ``.pt2`` program's ``aten`` conv/linear/batch-norm calls as layers again, for the pruner.
- ``prune_refusal``: why Torch-Pruning removed no channel, as the error that says what to do (exit 2).
- ``graph``: facts about an ONNX graph (signature, parameters, MACs) and ORT sessions.
- ``outcome``: what a run measured, as the manifest's ``metrics`` carry it.
- ``package``: the signed artifact, written atomically.
- ``digits``: the digits CNN and data the demo and tests train.
- ``errors``: the package's named failures, each with an exit code.
"""
