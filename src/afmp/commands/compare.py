"""`afmp compare`: one table over several runs (implemented in afmp.evaluate beside `afmp eval`)."""

from afmp.evaluate import add_compare_arguments as add_arguments
from afmp.evaluate import compare_main as main

__all__ = ["add_arguments", "main"]
