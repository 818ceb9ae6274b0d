"""icm-aux: image coding for machines with an auxiliary encoder loss (Iino et al., ICIP 2024)."""
from .netguard import install_from_env as _install_network_guard

__version__ = "0.1.0"
_install_network_guard()  # ICM_NO_NETWORK=1: no outgoing connections (see icm_helpers.netguard)
