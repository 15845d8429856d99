"""The reproduction of HPD22 (Han, Papyan & Donoho, ICLR 2022) built on the measuring library.

Data (:mod:`~ncfast.paper.data`), networks (:mod:`~ncfast.paper.models`), losses, training with
in-loop measurement (:mod:`~ncfast.paper.train`), several processes
(:mod:`~ncfast.paper.distributed`), checkpoints and run directories, DeepFool robustness,
``ncfast analyze`` (:mod:`~ncfast.paper.analyze`) and sweeps (:mod:`~ncfast.paper.sweep`).
"""
