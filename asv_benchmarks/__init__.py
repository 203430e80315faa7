"""airspeed velocity (asv) benchmark suite of fastlinear; ``asv.conf.json`` points here."""
