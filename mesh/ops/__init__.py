"""Running the daemons: settings (:mod:`.config`, :mod:`.settings_file`), systemd
(:mod:`.sdnotify`), metrics, logging, CURVE keys and child processes."""
