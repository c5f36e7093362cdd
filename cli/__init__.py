"""Somnus's entry points: the ``somnus`` command and the headless daemon.

The one place that wires the layers together: it opens the data folder and the store, picks the
engine through ``backends.select``, and hands the domain (``assistant/``) to the terminal app
(``tui/``) or to the plain commands. Nothing below imports it.
"""
