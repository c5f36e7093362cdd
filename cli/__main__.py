"""``python -m cli``: the ``somnus`` command without the installed script."""

from cli.main import main

main()
