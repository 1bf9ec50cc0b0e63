"""`afmp tune`: a hyperparameter search over afmp train, on Optuna (``pip install "afmp[tune]"``).

space (what a trial draws, from a YAML file, checked), storage (where the study lives: a
SQLite file or a database server), search (the trials, N workers at once, pruning on
validation accuracy) and outcome (trials.csv, best.yaml, best.json). The command line is
afmp.commands.tune.
"""
