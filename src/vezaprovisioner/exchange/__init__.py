"""Everything that talks to Exchange: the port, its error tree, and one module per backend."""
