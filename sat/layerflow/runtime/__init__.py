"""Devices, dtypes, CPU threads, ranks and the groups that share one video: the only place that knows them."""
