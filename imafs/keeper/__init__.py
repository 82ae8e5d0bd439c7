"""The keeper: the user-space service the staging ABI needs (issue 12).

It trims the kernel's measurement list through the securityfs files only
(``abi.py``), stores every record it removes in a durable archive
(``archive.py``) before any delete, finds and finishes what a killed run left
(``trim.py``), and rebuilds the whole log since boot for verifiers
(``whole.py``). ``service.py`` is the loop. docs/keeper.md has the rules.
"""
