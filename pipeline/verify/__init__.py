"""Stage 2: verify candidate pairs by behaviour (models that run), beside the weight hash of stage 1."""
