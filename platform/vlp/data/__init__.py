"""Data side: shard reading, media decoding, frame sampling, CLIP preprocessing, synthetic shards."""
