"""Masked Autoencoder model, training and evaluation built on mae_kernels."""
