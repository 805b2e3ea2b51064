"""The run's machinery: the typed config and what it builds, the Trainer and its step, where a run
begins, checkpoints and resumes, the out_dir, the log and the step statistics (docs/architecture.md)."""
