"""The rich consoles tuneforge prints on, and the one way a user's value goes into what they print.

Messages quote values a user chose: paths, run, file and model names, config values, rows of data,
prompts and model replies. Rich reads `[/x]` or `[bold]` in printed text as markup (a MarkupError, or
text swallowed) and `:x:` as an emoji's code. Every console comes from `new_console`, which reads no
emoji codes, in messages and in the text of a status spinner alike; tuneforge's own markup (colours,
bold) stays, and each user value in a message goes through `plain`, which escapes its markup.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape


class _Console(Console):
    """A console whose status spinner reads its text as the console reads a message: rich's own spinner
    reads emoji codes in it whatever the console says."""

    def status(self, status, **options):
        return super().status(self.render_str(status) if isinstance(status, str) else status, **options)


def new_console(*, stderr: bool = False, **options) -> Console:
    """A console on stdout (or stderr) that reads no emoji codes; `options` are rich's."""
    return _Console(stderr=stderr, emoji=False, **options)


def plain(value: object) -> str:
    """`value` as text to put into a message with markup, printed as written."""
    return escape(str(value))
