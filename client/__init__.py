"""hemex ClientApp: the hospital site side of the federation."""
