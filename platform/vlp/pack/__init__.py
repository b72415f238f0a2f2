"""``vlp pack``: a dataset's released annotation files + its media folder -> WebDataset shards.

``formats`` turns annotation files (LLaVA, Valley, Video-ChatGPT, LLaMA-Factory sharegpt, caption tables) into
common :class:`~vlp.pack.formats.PackRecord` s, streaming and bounded, without touching media; a malformed record
is a :class:`~vlp.pack.formats.PackError`, never a crash. ``group`` turns one group of records into its shard(s)
(media fetched, ``webdataset.ShardWriter``); ``pipeline`` is the run (:class:`~vlp.pack.pipeline.PackRun`: plan,
check_existing, pack on Ray Data or local threads, finish); ``config`` is :class:`PackConfig`.
May import: config, errors, registry, runtime, runlog, storage, data (sample, conversation, media), models.parts (the
typed-part machinery, no torch), webdataset, Ray (pipeline only). Never models' other modules, formats
(vlp.formats), precompute, train, cli.
"""

from .config import PackConfig
from .pipeline import run_pack

__all__ = ["PackConfig", "run_pack"]
