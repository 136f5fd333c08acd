"""kugetsu: turns Gitea issues into pull requests written by AI coding agents.

Importing this package has no side effects; `bot.cli:main` is the entry point.
"""

__version__ = "0.1.0"
