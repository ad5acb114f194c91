"""Library exceptions. Every error laser_fx raises on purpose derives from `LaserFxError`."""

from __future__ import annotations

__all__ = ["ConfigError", "LaserFxError", "NoSitesError", "TraceError"]


class LaserFxError(Exception):
    """Base class of every error laser_fx raises on purpose."""


class TraceError(LaserFxError):
    """The model could not be captured as a graph with the same forward and autograd behaviour."""


class NoSitesError(LaserFxError):
    """The model has no weight-shared (looped) site to compress."""


class ConfigError(LaserFxError, ValueError):
    """A configuration value, site selector or argument is invalid."""
