"""Feature precompute: WebDataset shards -> frozen CLIP features, streamed with Ray Data.
May import: config, storage, errors, data, models, formats, runtime, runlog."""

from .config import DataConfig, EncoderConfig, OutputConfig, PrecomputeConfig
from ..formats.featureset import committed_shards, iter_feature_rows, open_feature_dataset
from .pipeline import FeatureSetMismatch, PrecomputeRun, run_precompute

__all__ = ["DataConfig", "EncoderConfig", "OutputConfig", "PrecomputeConfig", "committed_shards",
           "iter_feature_rows", "open_feature_dataset", "FeatureSetMismatch", "PrecomputeRun", "run_precompute"]
