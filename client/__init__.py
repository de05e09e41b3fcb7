"""The Flower ClientApp side of fedrec (local DP-SGD training on a device's own data)."""
