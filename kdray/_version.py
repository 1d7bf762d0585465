"""kdray's version, in a module of its own so that any module can read it without importing the
package's public API (kdray/__init__.py), which imports them back."""

__version__ = "0.1.0"
