"""Small subcommands of the ``afmp`` console script (the big ones live beside their code)."""
