"""rrstem.model: the rrVAE and everything that trains it or applies it; imports nothing else of rrstem.

- ``interface``: what the model reads (``ScanView``) and offers (``Encoder``, ``ModelMaps``, map and history names)
- ``rrvae``: the network, its config (``RRVAEConfig``) and its loss
- ``config``: ``TrainerConfig``, which holds an ``RRVAEConfig``
- ``training``: ``TrainingRun``, the synchronous core that trains on one scan
- ``trainer``: ``OnlineTrainer``, the thread that drives it (an ``Encoder``)
- ``inference``: ``FixedEncoder``, a trained model applied without training (an ``Encoder``)
- ``worker``: the thread both encoders run in; ``encode``, ``sampler``, ``metrics``, ``checkpoint``, ``system``: parts
"""
