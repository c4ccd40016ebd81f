"""Files and the console: checkpoint headers, byte sizes, SIGTERM while writing, and console noise."""
