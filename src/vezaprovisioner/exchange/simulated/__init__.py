"""The simulated Exchange, for the demo and for CI, in three modules.

`directory` (the directory file: format, loading, validation), `naming` (Exchange's rules for
distinguished names, aliases and addresses) and `engine` (`SimulatedExchange`, the port itself).
"""
