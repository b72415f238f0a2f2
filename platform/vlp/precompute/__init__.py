"""Feature precompute: WebDataset shards -> frozen CLIP features, streamed with Ray Data."""

from .config import DataConfig, EncoderConfig, OutputConfig, PrecomputeConfig
from ..formats.featureset import committed_shards, iter_feature_rows, open_feature_dataset
from .pipeline import FeatureSetMismatch, run_precompute

__all__ = ["DataConfig", "EncoderConfig", "OutputConfig", "PrecomputeConfig", "committed_shards",
           "iter_feature_rows", "open_feature_dataset", "FeatureSetMismatch", "run_precompute"]
