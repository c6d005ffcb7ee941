"""Judge prompt templates (``string.Template`` files, ``$name`` placeholders), shipped as package data."""
