"""dpolab: Direct Preference Optimization and the direct alignment family."""

__version__ = "0.1.0"
