"""corral: a control plane for batch and ML jobs on a fleet of machines."""

__version__ = "0.1.0"
