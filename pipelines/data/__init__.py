"""Data: adapters that index audio as users have it on disk, the procedural synthetic set, preparation into fbank
Parquet shards with a dataset card, and the feed that hands Ray Train workers model-ready batches."""
