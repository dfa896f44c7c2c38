"""Many samples in one run: manifests and prompt files, sharded over ranks, resumable, failures recorded."""
