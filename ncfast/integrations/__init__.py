"""Glue to other tools, each imported only when used: TensorBoard
(:mod:`~ncfast.integrations.tensorboard`)."""
