"""The trainable or stateful parts of the methods, one module per family (named as in :mod:`kdloss.functional`).

- :mod:`kdloss.parts.adapters`: ``ConvAdapter``, ``LinearAdapter``, ``PoolAdapter``, ``adapter_for``, ...
- :mod:`kdloss.parts.feature`: VID's regressor, AB's connector, FT's paraphraser and translator, ReviewKD's fusion.
- :mod:`kdloss.parts.contrastive`: CRD's memory bank (``ContrastMemory``).
- :mod:`kdloss.parts.heads`: intermediate classifier heads (DIH, MHKD, TOFD).
- :mod:`kdloss.parts.fused_linear`: ``TeacherTopK``, a teacher's top-k outputs stored once on disk for ``sparse_kd``.

They hold parameters or buffers, live with the student side (so the optimiser, DDP and
checkpoints see them) and leave the loss arithmetic to :mod:`kdloss.functional`.
"""
