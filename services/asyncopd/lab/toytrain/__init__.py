"""`asyncopd toy`: train the tiny toy teacher and student that ship in assets/ (lab code, not a service)."""
