"""``python -m assistant.sleep``: one sleep in its own process (``runner.main``).

The package is the entry point rather than ``assistant.sleep.runner`` itself: the package imports
the runner for its public names, and running a module the package has already imported makes Python
warn on the user's terminal.
"""

import sys

from assistant.sleep.runner import main

sys.exit(main())
