"""The built-in algorithms, one module each: its section, its recipe and its `ALGORITHM`
(stages/algorithm.py). Every module here is one, found by the registry without a list; an
algorithm from another package registers through the entry point group `alignflow.algorithms`
instead."""
