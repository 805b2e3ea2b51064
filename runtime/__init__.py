"""What every script and run stands on: ranks and devices, precision, signals and exit codes, FSDP's
sharding, one-line errors, progress lines, and files written whole or not at all. It imports nothing of
the project's (docs/architecture.md)."""
