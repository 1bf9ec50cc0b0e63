"""The subcommands of the ``afmp`` console script that drive the library: train, eval, viz,
compare, listops, models. (``afmp bench``, ``ablate`` and ``reproduce`` have their command
lines beside their studies, in afmp.bench.cli and afmp.studies.)"""
