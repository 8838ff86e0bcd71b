"""The command side below ``cli.py``: commands that orchestrate several stages (scan, analyses, pages) for one output.

``report``: the ``mmdetect report`` click command (and ``scan --format html``); ``page``: what it builds, from a model,
a scan output, a sweep folder or a track folder.
"""
