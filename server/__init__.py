"""hemex ServerApp: the coordinator side of the federation."""
