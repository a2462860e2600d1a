"""What a run leaves: the run recorder (`recorder`: metrics and predictions Parquet, TensorBoard,
console tables), run directories read back (`runs`), where they live (`storage`: a path or a
pyarrow URI) and what a resume may not change (`resume_check`)."""
