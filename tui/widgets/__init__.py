"""The app's widgets: the conversation, the sessions sidebar, the status bar and the dialogs."""
