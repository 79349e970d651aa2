"""rrstem.model: the rrVAE and everything that trains it or applies it; imports nothing else of rrstem.

- ``interface``: what the model reads (``ScanView``) and offers (``ScanEncoder``, ``ModelMaps``, map and history names)
- ``rrvae``: the network (``ImageEncoder`` and the coordinate decoder), its config (``RRVAEConfig``) and its loss
- ``config``: ``TrainerConfig``, which holds an ``RRVAEConfig``
- ``run``: ``TrainingRun``, the synchronous core that trains on one scan; ``optim``: Adam and its schedules
- ``trainer``: ``OnlineTrainer``, the thread that drives it (a ``ScanEncoder``)
- ``inference``: ``FixedEncoder``, a trained model applied without training (a ``ScanEncoder``)
- ``worker``: the thread both encoders run in; ``encode``, ``sampler``, ``metrics``, ``checkpoint``, ``system``: parts
"""
