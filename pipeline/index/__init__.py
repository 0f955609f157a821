"""The index: Parquet shards of model codes, committed run by run."""
