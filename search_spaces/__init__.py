"""YAML search spaces for the sweeps; see schema.py for the file format."""

from search_spaces.schema import SearchSpace, SpaceError, available_spaces, load_space

__all__ = ["SearchSpace", "SpaceError", "available_spaces", "load_space"]
