"""The bottom layer: errors, atomic files, the stage cache. Imports nothing else of fspo."""
