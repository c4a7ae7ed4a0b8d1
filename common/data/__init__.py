"""Site data: the on-disk contract, image I/O and preprocessing, and the `hemex check` validator."""
