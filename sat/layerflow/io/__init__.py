"""Files in and out: layer pixels, reading given layers, writing videos and contact sheets, the names in a
sample folder, manifest lines, what in an output folder is ours, atomic writes."""
