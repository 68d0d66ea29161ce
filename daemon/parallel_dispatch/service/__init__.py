"""The long-running service: `parallel-dispatch watch` (the daemon, its file watcher,
systemd's sd_notify).  A front end on the core; started by the CLI's `watch`."""
