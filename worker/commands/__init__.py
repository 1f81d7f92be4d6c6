"""One module per `tiktok-worker` sub-command; each exposes `run(args) -> int`."""
