"""What every stage stands on: kdray's one-line errors, config value parsing, run guards, the trial-outcome
protocol, console and process exit, shipped files, the device and precision, and file I/O."""
