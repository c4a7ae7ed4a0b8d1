"""What the Flower apps on both sides share: run settings, weight records, the reply whitelist."""
