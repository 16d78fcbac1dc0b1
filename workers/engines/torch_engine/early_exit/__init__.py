"""Early exit for the torch engine (DeeR exits over the engine's layer loop).

``decode`` runs a decode step exit by exit; ``points`` holds calibrated operating points and picks
one per request; ``control`` wires both into the engine and its accounting; ``calibrate``,
``adapters`` and ``jobs`` are the offline side behind ``wattserve exits calibrate`` and ``fit``.
"""
