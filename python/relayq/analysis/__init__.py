"""Analysis tools: the numpy integer reference executor, per-layer error reports."""
