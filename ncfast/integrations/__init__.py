"""Glue to other tools, each imported only when used and each an optional extra:

- :mod:`~ncfast.integrations.tensorboard`: :class:`TensorBoardWriter` and
  :func:`log_to_tensorboard` (``pip install 'ncfast[tensorboard]'``);
- :mod:`~ncfast.integrations.torchmetrics`: :class:`NeuralCollapse`, a ``torchmetrics.Metric``
  (``ncfast[torchmetrics]``);
- :mod:`~ncfast.integrations.lightning`: :class:`NeuralCollapseCallback`, a Lightning callback
  (``ncfast[lightning]``);
- :mod:`~ncfast.integrations.transformers`: :func:`measure_language_model` and
  :class:`NeuralCollapseCallback`, token-level NC of Hugging Face causal language models
  (``ncfast[transformers]``).
"""
