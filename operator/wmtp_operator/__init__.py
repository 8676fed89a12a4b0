"""The kopf operator that runs WMTPRun resources as groups of trainer pods."""

__version__ = "0.1.0"
