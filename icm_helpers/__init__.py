"""icm-aux: image coding for machines with an auxiliary encoder loss (Iino et al., ICIP 2024)."""
__version__ = "0.1.0"
