"""Wire formats of other tools' dump files, each declared once and both read and written."""
