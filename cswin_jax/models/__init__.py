"""Flax networks: the CSWin generator and the spectral-norm discriminator."""
