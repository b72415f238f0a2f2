"""``vlp pack``: a dataset's released annotation files + its media folder -> WebDataset shards.

``formats`` turns annotation files (LLaVA, Valley, Video-ChatGPT, LLaMA-Factory sharegpt, caption tables) into
common :class:`~vlp.pack.formats.PackRecord` s, streaming and bounded, without touching media; a malformed record
is a :class:`~vlp.pack.formats.PackError`, never a crash. The Ray pipeline and the shard writer build on it.
May import: config, errors, registry, storage, data (sample, conversation, media), models.parts (the typed-part
machinery, no torch). Never models' other modules, formats (vlp.formats), precompute, train, cli.
"""
