"""Files in and out: layer pixels, reading given layers, writing videos, sample folders, atomic writes."""
