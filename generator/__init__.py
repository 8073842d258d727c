"""Tooling around the Copier template: render projects, keep examples/ and the manifest current.

``python -m generator <command>``; see ``__main__`` for the commands.
"""
