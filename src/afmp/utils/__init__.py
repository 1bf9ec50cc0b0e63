"""What every other part uses and that uses nothing of afmp: the error rule (errors), atomic
files (files), the KEY=VALUE reader (options), environment variables (environment), and the
device, seed, precision and thread helpers (runtime)."""
