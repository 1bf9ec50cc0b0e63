"""A trained run put to use outside training: predict the classes of files, export the model.

Each module reads a run directory alone (its config, weights and preprocessing), so what it
does matches what ``afmp eval`` measured on that run.
"""
