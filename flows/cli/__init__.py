"""The ``brats`` command and the long-lived helpers around the flows: the temporary Prefect API
(``embedded``), the event commands (``events``: watch, submit), the served worker (``served``) and
the registry commands (``registry``). ``main`` is the program; ``options`` makes its options.
"""
