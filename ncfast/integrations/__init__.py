"""Glue to other tools, each imported only when used and each an optional extra:

- :mod:`~ncfast.integrations.tensorboard`: :class:`TensorBoardWriter` and
  :func:`log_to_tensorboard` (``pip install 'ncfast[tensorboard]'``);
- :mod:`~ncfast.integrations.torchmetrics`: :class:`NeuralCollapse`, a ``torchmetrics.Metric``
  (``ncfast[torchmetrics]``);
- :mod:`~ncfast.integrations.lightning`: :class:`NeuralCollapseCallback`, a Lightning callback
  (``ncfast[lightning]``).
"""
